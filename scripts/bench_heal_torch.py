"""PyTorch reference for `surgeon heal` throughput: the same model, sequence length, batch, steps,
AdamW over all parameters, f32 on CPU. Prints training tokens/s (all steps timed, like surgeon).

usage: bench_heal_torch.py MODEL_DIR TEXT_FILE --seq-len L --batch B --steps N --threads T
"""
import argparse, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("text")
ap.add_argument("--seq-len", type=int, default=128)
ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--steps", type=int, default=4)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--lr", type=float, default=1e-5)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
model.train()
ids = tok(open(a.text).read(), add_special_tokens=False)["input_ids"]
L, B = a.seq_len, a.batch
need = a.steps * B * L + 1
assert len(ids) >= need, f"text too short: {len(ids)} tokens < {need}"
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0, eps=1e-8)
pos = 0
t0 = time.time()
for step in range(a.steps):
    x = torch.tensor([ids[pos + b * L: pos + b * L + L + 1] for b in range(B)])
    pos += B * L
    out = model(input_ids=x[:, :-1])
    logits = out.logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    print(f"step {step + 1} loss {loss.item():.4f} {time.time() - t0:.1f}s", flush=True)
dt = time.time() - t0
print(f"torch tokens/s {a.steps * B * L / dt:.1f} ({a.steps} steps, {dt:.1f}s, threads {a.threads})")
