"""PyTorch reference for `surgeon heal` throughput (used by scripts/bench-heal.sh): the same model,
sequence length, batch and steps, AdamW over all parameters, global-norm clipping, f32 eager on CPU.

Without --teacher the loss is next-token cross-entropy (`surgeon heal --loss lm`); with it, the
knowledge-distillation loss of `surgeon heal --loss kd`: T^2 * mean over tokens of KL(p_T || p_S),
p = softmax(logits / T), the teacher run under torch.no_grad().

usage: bench-heal-torch.py MODEL_DIR TEXT_FILE [--teacher DIR] [--temperature T] --seq-len L
       --batch B --steps N --threads T --lr LR --clip C
Prints one line per step and `torch tokens/s X` over all steps (the script times whole processes).
"""
import argparse, sys, time
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("text")
ap.add_argument("--teacher")
ap.add_argument("--temperature", type=float, default=1.0)
ap.add_argument("--seq-len", type=int, default=256)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--steps", type=int, default=4)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--clip", type=float, default=1.0)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
model.train()
teacher = None
if a.teacher:
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
    teacher.requires_grad_(False)
ids = tok(open(a.text).read(), add_special_tokens=False)["input_ids"]
L, B, T = a.seq_len, a.batch, a.temperature
need = a.steps * B * L + 1
assert len(ids) >= need, f"text too short: {len(ids)} tokens < {need}"
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0, eps=1e-8)


def loss_of(x):
    logits = model(input_ids=x[:, :-1]).logits
    V = logits.shape[-1]
    if teacher is None:
        return F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
    with torch.no_grad():
        lt = F.log_softmax(teacher(input_ids=x[:, :-1]).logits.reshape(-1, V) / T, dim=-1)
    ls = F.log_softmax(logits.reshape(-1, V) / T, dim=-1)
    return F.kl_div(ls, lt, reduction="batchmean", log_target=True) * (T * T)


pos = 0
t0 = time.time()
for step in range(a.steps):
    x = torch.tensor([ids[pos + b * L: pos + b * L + L + 1] for b in range(B)])
    pos += B * L
    loss = loss_of(x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
    opt.step()
    print(f"step {step + 1} loss {loss.item():.4f} grad_norm {norm.item():.3f} "
          f"{time.time() - t0:.1f}s", file=sys.stderr, flush=True)
dt = time.time() - t0
print(f"torch tokens/s {a.steps * B * L / dt:.1f} ({a.steps} steps, {dt:.1f}s, threads {a.threads})")
