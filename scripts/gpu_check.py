"""PyTorch side of scripts/gpu-check.sh: the same synthetic weights, the same tokens, the same loss.

  gpu_check.py prepare MODEL_DIR TEXT --tokens N [--seed S]
      writes MODEL_DIR/tokenizer.json (word-level: token `t<i>` is id i, for the model's whole
      vocabulary, so no download is needed) and TEXT, N random tokens.
  gpu_check.py logits MODEL_DIR TEXT SURGEON_LOGITS --window W --device D
      transformers f32 logits of the first W tokens against surgeon's (`eval --logits-out`).
  gpu_check.py eval MODEL_DIR TEXT --window W --batch-size B --max-tokens N --device D
      f32 perplexity windows as `surgeon eval` scores them; tokens/s.
  gpu_check.py heal STUDENT TEACHER TEXT --seq-len L --batch B --steps N --device D
      the KD loop of `surgeon heal --loss kd --precision bf16` in eager PyTorch under bf16 autocast:
      T^2 * KL(teacher || student) averaged over tokens, AdamW (0.9, 0.999, 1e-8, no decay) over
      every student parameter, clip 1.0; the frozen teacher in bf16 as surgeon stores it. tokens/s
      over all steps and the peak memory.
  gpu_check.py table RESULTS.jsonl
      the table of everything measured (one JSON object per line, written by gpu-check.sh).

Each measuring command prints one JSON object. Works with the transformers of the GPU machine
and older ones (no `dtype=` keyword, `.float()` instead).
"""
import argparse, json, random, sys, time


def prepare(a):
    cfg = json.load(open(f"{a.model}/config.json"))
    v = cfg["vocab_size"]
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(v)}, "unk_token": "t0"},
    }
    json.dump(tok, open(f"{a.model}/tokenizer.json", "w"))
    rng = random.Random(a.seed)
    with open(a.text, "w") as f:
        f.write(" ".join(f"t{rng.randrange(1, v)}" for _ in range(a.tokens)))
        f.write("\n")


def token_ids(text):
    return [int(w[1:]) for w in open(text).read().split()]


def load(model, device, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model).float()
    if dtype is not None:
        m = m.to(dtype)
    return m.to(device)


def sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def logits(a):
    import numpy as np, torch
    m = load(a.model, a.device).eval()
    ids = token_ids(a.text)[: a.window]
    with torch.no_grad():
        ref = m(torch.tensor([ids], device=a.device)).logits[0].float().cpu().numpy()
    ours = np.fromfile(a.surgeon_logits, dtype="<f4")
    if ours.size != ref.size:
        sys.exit(f"surgeon wrote {ours.size} logits, transformers has {ref.size} ({ref.shape})")
    d = np.abs(ours.reshape(ref.shape) - ref)
    print(json.dumps({"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                      "logit_scale": float(np.abs(ref).max()), "tokens": len(ids)}))


def evaluate(a):
    import math, torch
    m = load(a.model, a.device).eval()
    ids = token_ids(a.text)[: a.max_tokens + 1]
    w = a.window
    wins = [ids[i: i + w + 1] for i in range(0, len(ids) - w, w)]
    nll, n = 0.0, 0
    with torch.no_grad():
        m(torch.tensor([wins[0]], device=a.device)[:, :-1])  # warm-up, untimed
        sync(a.device)
        t0 = time.time()
        for i in range(0, len(wins), a.batch_size):
            x = torch.tensor(wins[i: i + a.batch_size], device=a.device)
            lg = m(x[:, :-1]).logits.float()
            nll += torch.nn.functional.cross_entropy(
                lg.reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            n += x.shape[0] * w
        sync(a.device)
        dt = time.time() - t0
    print(json.dumps({"tokens_per_s": n / dt, "ppl": math.exp(nll / n), "tokens": n}))


def heal(a):
    import torch
    dev = a.device
    torch.manual_seed(0)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    student = load(a.student, dev).train()
    teacher = load(a.teacher, dev, torch.bfloat16).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    ids = token_ids(a.text)
    L, B, T = a.seq_len, a.batch, a.temperature
    need = a.steps * B * (L + 1)
    if len(ids) < need:
        sys.exit(f"text too short: {len(ids)} tokens < {need}")
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    kind = "cuda" if dev.startswith("cuda") else "cpu"
    pos, losses = 0, []
    sync(dev)
    t0 = time.time()
    for _ in range(a.steps):
        x = torch.tensor([ids[pos + b * (L + 1): pos + (b + 1) * (L + 1)] for b in range(B)],
                         device=dev)
        pos += B * (L + 1)
        with torch.autocast(kind, dtype=torch.bfloat16):
            with torch.no_grad():
                tl = teacher(x[:, :-1]).logits
            sl = student(x[:, :-1]).logits
        ls = torch.log_softmax(sl.float() / T, -1)
        lt = torch.log_softmax(tl.float() / T, -1)
        loss = (lt.exp() * (lt - ls)).sum(-1).mean() * T * T
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    sync(dev)
    dt = time.time() - t0
    out = {"tokens_per_s": a.steps * B * L / dt, "loss_first": losses[0], "loss_last": losses[-1]}
    if dev.startswith("cuda"):
        out["torch_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["torch_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    print(json.dumps(out))


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def table(a):
    rows = [json.loads(l) for l in open(a.results) if l.strip()]
    by = {}
    for r in rows:
        by.setdefault(r["shape"], {}).update(r)
    head = ("shape", "logits max|d|", "eval tok/s surgeon", "torch", "x",
            "KD heal tok/s surgeon", "torch bf16", "x", "peak mem GiB surgeon", "torch")
    lines = [head]
    for shape, r in by.items():
        lines.append((
            shape,
            fmt(r.get("max_abs_diff"), ".2e") + ("" if r.get("max_abs_diff") is None else
                                                  (" ok" if r["max_abs_diff"] <= 1e-3 else " >1e-3")),
            fmt(r.get("surgeon_eval_tps"), ".0f"), fmt(r.get("torch_eval_tps"), ".0f"),
            fmt(ratio(r.get("surgeon_eval_tps"), r.get("torch_eval_tps")), ".2f"),
            fmt(r.get("surgeon_heal_tps"), ".0f"), fmt(r.get("torch_heal_tps"), ".0f"),
            fmt(ratio(r.get("surgeon_heal_tps"), r.get("torch_heal_tps")), ".2f"),
            fmt(r.get("surgeon_heal_mem_gib"), ".2f"), fmt(r.get("torch_heal_mem_gib"), ".2f"),
        ))
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    for i, l in enumerate(lines):
        print(" | ".join(str(c).ljust(w) for c, w in zip(l, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    for shape, r in by.items():
        for k in sorted(r):
            if k.endswith("_error"):
                print(f"{shape}: {k[:-6]}: {r[k]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare"); p.add_argument("model"); p.add_argument("text")
    p.add_argument("--tokens", type=int, required=True); p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("logits"); p.add_argument("model"); p.add_argument("text")
    p.add_argument("surgeon_logits"); p.add_argument("--window", type=int, required=True)
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("eval"); p.add_argument("model"); p.add_argument("text")
    p.add_argument("--window", type=int, required=True); p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-tokens", type=int, required=True); p.add_argument("--device", default="cuda")
    p = sub.add_parser("heal"); p.add_argument("student"); p.add_argument("teacher"); p.add_argument("text")
    p.add_argument("--seq-len", type=int, required=True); p.add_argument("--batch", type=int, required=True)
    p.add_argument("--steps", type=int, required=True); p.add_argument("--device", default="cuda")
    p.add_argument("--lr", type=float, default=1e-5); p.add_argument("--temperature", type=float, default=1.0)
    p = sub.add_parser("table"); p.add_argument("results")
    a = ap.parse_args()
    {"prepare": prepare, "logits": logits, "eval": evaluate, "heal": heal, "table": table}[a.cmd](a)


if __name__ == "__main__":
    main()
