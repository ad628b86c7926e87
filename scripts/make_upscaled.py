"""Stand-in for `surgeon expand` / `surgeon upscale` (on branch `surgery`, not yet in main) for the
healing demo: writes an expanded (LLaMA Pro) or depth-up-scaled (SOLAR) copy of an HF Llama dir.

usage: make_upscaled.py SRC OUT expand P      # insert P identity blocks (zero o_proj/down_proj)
       make_upscaled.py SRC OUT dus M         # layers 0..n-M ++ M..n
"""
import json, os, shutil, sys
from safetensors.torch import load_file, save_file

src, out, mode, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = json.load(open(os.path.join(src, "config.json")))
w = load_file(os.path.join(src, "model.safetensors"))
n = cfg["num_hidden_layers"]
if mode == "expand":
    split = n // k
    order, new = [], []
    for i in range(n):
        order.append((i, False))
        if (i + 1) % split == 0:
            order.append((i, True))
else:
    order = [(i, False) for i in range(0, n - k)] + [(i, False) for i in range(k, n)]
res, new_layers = {}, []
for name, t in w.items():
    if not name.startswith("model.layers."):
        res[name] = t
for j, (i, zero) in enumerate(order):
    if zero:
        new_layers.append(j)
    pre = f"model.layers.{i}."
    for name, t in w.items():
        if name.startswith(pre):
            rest = name[len(pre):]
            t = t.clone()
            if zero and rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                t.zero_()
            res[f"model.layers.{j}.{rest}"] = t
cfg["num_hidden_layers"] = len(order)
sur = cfg.setdefault("surgeon", {})
if new_layers:
    sur["new_layers"] = new_layers
sur.setdefault("history", []).append(f"make_upscaled.py {mode} {k}")
os.makedirs(out, exist_ok=True)
save_file(res, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
for f in os.listdir(src):
    if f not in ("config.json", "model.safetensors") and os.path.isfile(os.path.join(src, f)):
        shutil.copy(os.path.join(src, f), out)
print(f"{out}: {len(order)} layers, new {new_layers}")
