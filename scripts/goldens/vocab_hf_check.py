"""Checks an `surgeon extend-vocab` output with Hugging Face tokenizers and transformers.

usage: python scripts/goldens/vocab_hf_check.py ORIGINAL_DIR EXTENDED_DIR [HELDOUT_TEXT]

- tokenizers loads the new tokenizer.json; every old id maps to the same token string;
  held-out text round-trips; tokens/char before and after on the held-out text.
- transformers loads tokenizer and model; embedding has config.vocab_size rows; the ids recorded in
  config.json `surgeon.new_token_ids` are the new tokens; for English text (no new tokens) the
  logits of old-vocabulary ids equal the original model's (max abs difference printed, must be 0
  for tied/untied models since old rows are copied bitwise).
Run with the reference Python ($SURGEON_PYTHON, see scripts/env.sh: torch + transformers 5).
"""
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer


def main():
    orig, ext = Path(sys.argv[1]), Path(sys.argv[2])
    held = Path(sys.argv[3]).read_text(encoding="utf-8").splitlines() if len(sys.argv) > 3 else []
    held = [h for h in held if h.strip()]
    t0 = Tokenizer.from_file(str(orig / "tokenizer.json"))
    t1 = Tokenizer.from_file(str(ext / "tokenizer.json"))
    n0, n1 = t0.get_vocab_size(True), t1.get_vocab_size(True)
    changed = [i for i in range(n0) if t0.id_to_token(i) != t1.id_to_token(i)]
    assert not changed, f"old ids changed: {changed[:5]}"
    cfg = json.loads((ext / "config.json").read_text())
    new_ids = cfg.get("surgeon", {}).get("new_token_ids", [])
    print(f"tokenizers: {n0} -> {n1} ids, {len(new_ids)} new ids recorded, old ids unchanged")
    if held:
        for line in held:
            ids = t1.encode(line, add_special_tokens=False).ids
            assert t1.decode(ids) == line, line
        c = sum(len(h) for h in held)
        b = sum(len(t0.encode(h, add_special_tokens=False).ids) for h in held) / c
        a = sum(len(t1.encode(h, add_special_tokens=False).ids) for h in held) / c
        print(f"held-out tokens/char {b:.4f} -> {a:.4f} ({100 * (a / b - 1):+.1f}%), round-trip ok")

    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        print(f"transformers not available ({e}); tokenizers checks only")
        return
    tok = AutoTokenizer.from_pretrained(ext)
    text = "The quick brown fox jumps over the lazy dog."
    assert tok(text, add_special_tokens=False)["input_ids"] == t1.encode(text, add_special_tokens=False).ids
    if held:
        ids = tok(held[0], add_special_tokens=False)["input_ids"]
        assert any(i in set(new_ids) for i in ids), "no new token used on held-out text"
        assert tok.decode(ids) == held[0]
    m0 = AutoModelForCausalLM.from_pretrained(orig, dtype=torch.float32)
    m1 = AutoModelForCausalLM.from_pretrained(ext, dtype=torch.float32)
    emb = m1.get_input_embeddings().weight
    assert emb.shape[0] == cfg["vocab_size"], (emb.shape, cfg["vocab_size"])
    assert torch.equal(emb[: m0.get_input_embeddings().weight.shape[0]], m0.get_input_embeddings().weight)
    x = torch.tensor([t0.encode(text, add_special_tokens=False).ids])
    with torch.no_grad():
        l0 = m0(x).logits[0]
        l1 = m1(x).logits[0]
    d = (l1[:, : l0.shape[1]] - l0).abs().max().item()
    print(f"transformers: loaded, embeddings {tuple(emb.shape)}, old-vocab logits max |diff| = {d:g}")
    assert d == 0.0, d


if __name__ == "__main__":
    main()
