"""Prints a mergekit passthrough recipe for half-open layer slices: mergekit_recipe.py MODEL 0..16,6..22"""
import sys

model, slices = sys.argv[1], sys.argv[2]
print("slices:")
for part in slices.split(","):
    a, b = (int(x) for x in part.split(".."))
    print(f"  - sources:\n      - model: {model}\n        layer_range: [{a}, {b}]")
print("merge_method: passthrough\ndtype: bfloat16")
