"""Q4: passkey retrieval in miniature — LongLoRA extends a small Llama from 256 to 1,024 tokens.

1. **Pre-train** a small Llama (hidden 64, 2 layers, 4 heads, vocab 64, RoPE θ = 10⁴) from scratch
   on a synthetic passkey task at contexts up to ``L0`` = 256: random filler tokens, somewhere a
   needle ``[M k1 k2 k3 k4]`` (four distinct key symbols), and at the end ``[M k1 k2 k3 k4]`` again;
   the loss is on the four key tokens of the end block only (retrieving them is the task).
2. **Extend** with LongLoRA to ``4 · L0``: ``LongLoraConfig(context_factor=4)`` (linear position
   interpolation), S2-Attn with G = N/4 while training, LoRA r 8 on q/k/v/o, embeddings and norms
   trained; fine-tuned on the same task at contexts up to ``4 · L0``.
3. **Evaluate** with full attention (eval mode) at each context length: exact-match retrieval of
   all four key tokens under greedy decoding (equivalently: every teacher-forced argmax right),
   needle depth uniform over the context, the same fixed samples for every model.

Rows: the pre-trained model as is; the same with position interpolation but no fine-tuning; the
LongLoRA-extended model (optionally also one fine-tuned with full attention instead of S2,
``--compare-full``). Sized for 2 CPU cores, about 10 minutes with the defaults:

    PYTHONPATH=src python bench/q4_passkey.py
    PYTHONPATH=src python bench/q4_passkey.py --pretrain-steps 150 --extend-steps 40 --eval 32
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import peftkit

VOCAB, MARK, KEY0, KEYS, FILLER0 = 128, 1, 2, 16, 18
K = 4  # key length
HALF = (4, 12)  # copy-block half lengths, drawn per sequence


def tiny_llama(l0: int, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=l0,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def passkey_batch(n: int, length: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(ids, supervised)``, both (n, length).

    The text: random filler laid out in copy blocks (a random half of h tokens, then the same h
    tokens again; h drawn per sequence, so only matching content, not a fixed offset, predicts
    the copy), a needle ``M k1..k4`` (four distinct key symbols) at a uniform depth, and the
    query ``M k1..k4`` last. Supervised tokens: every copied token after a block's first (local
    induction, a dense signal that stays inside S2's groups) and the four key tokens at the end
    (the passkey, anywhere in the context)."""
    idx = torch.arange(length)  # (L,)
    half = torch.randint(HALF[0], HALF[1] + 1, (n, 1), generator=g)  # (n, 1)
    second = (idx % (2 * half)) >= half  # (n, L): in a block's second half
    src = torch.where(second, idx - half, idx)  # (n, L)
    x = torch.randint(FILLER0, VOCAB, (n, length), generator=g).gather(1, src)  # (n, L)
    keys = torch.stack([torch.randperm(KEYS, generator=g)[:K] for _ in range(n)]) + KEY0  # (n, K)
    block = torch.cat([torch.full((n, 1), MARK), keys], dim=1)  # (n, K + 1)
    depth = torch.randint(0, length - 2 * (K + 1) + 1, (n, 1), generator=g)  # (n, 1)
    x.scatter_(1, depth + torch.arange(K + 1), block)
    x[:, -(K + 1) :] = block
    prev = x.gather(1, (src - 1).clamp_min(0))  # (n, L): the token before the copy's source
    copied = second & (idx % (2 * half) > half) & (x == x.gather(1, src))
    copied &= x.roll(1, dims=1) == prev  # the context that predicts it is intact too
    copied[:, -(K + 1) :] = False
    supervised = copied
    supervised[:, -K:] = True
    return x, supervised


def passkey_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Logits that predict the last K tokens (the passkey): (n, K, V)."""
    logits: Tensor = model(input_ids=x, use_cache=False).logits
    return logits[:, -(K + 1) : -1]


def train(
    model: nn.Module, steps: int, lengths: list[int], batch: int, lr: float, seed: int
) -> float:
    """AdamW on the answer loss, lr warm-up then cosine decay; returns seconds spent."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm)
            * 0.5
            * (1 + torch.cos(torch.tensor(torch.pi * s / max(1, steps))).item())
        ),
    )
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        length = lengths[step % len(lengths)]
        # Note: equal token count per step whatever the length (the longest gets ``batch``).
        n = max(1, batch * max(lengths) // length)
        x, supervised = passkey_batch(n, length, g)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1]  # (n, L - 1, V)
        mask = supervised[:, 1:]  # (n, L - 1): which next tokens count
        loss = F.cross_entropy(logits[mask], x[:, 1:][mask])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"    step {step:4d}  length {length:4d}  loss {loss.item():.3f}", flush=True)
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(
    model: nn.Module, samples: dict[int, tuple[Tensor, Tensor]], batch: int = 16
) -> dict[int, float]:
    model.eval()
    out = {}
    for length, (x, _) in samples.items():
        hits = 0
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            pred = passkey_logits(model, xb).argmax(-1)  # (b, K)
            hits += int((pred == xb[:, -K:]).all(dim=1).sum())
        out[length] = hits / len(x)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--l0", type=int, default=256, help="pre-training context")
    parser.add_argument("--factor", type=int, default=4, help="context extension factor")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--extend-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step at the longest")
    parser.add_argument("--eval", type=int, default=100, help="samples per context length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compare-full",
        action="store_true",
        help="also extend with full attention instead of S2 (for comparison)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    l0, target = args.l0, args.l0 * args.factor
    lengths = [l0 * i // 4 for i in range(1, 4 * args.factor + 1) if l0 * i // 4 >= l0 // 2]
    eval_lengths = [length for length in lengths if length % (l0 // 2) == 0]
    g = torch.Generator().manual_seed(1234)
    samples = {length: passkey_batch(args.eval, length, g) for length in eval_lengths}
    t0 = time.perf_counter()

    print(f"pre-training at contexts {l0 // 4}..{l0} ({args.pretrain_steps} steps)")
    base = tiny_llama(l0)
    secs = train(
        base,
        args.pretrain_steps,
        [l0 * i // 4 for i in (1, 2, 3, 4)],
        args.batch * args.factor,
        3e-3,
        seed=0,
    )
    rows: dict[str, dict[int, float]] = {
        f"pre-trained at {l0}, no extension": accuracy(base, samples)
    }
    print(f"  {secs:.0f} s")
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def extended(ratio: float | None) -> nn.Module:
        model = tiny_llama(l0)
        model.load_state_dict(state)
        peftkit.adapt(
            model, peftkit.LongLoraConfig(r=8, group_size_ratio=ratio, context_factor=args.factor)
        )
        return model

    rows[f"+ position interpolation x{args.factor}, no fine-tuning"] = accuracy(
        extended(0.25), samples
    )
    variants = {"LongLoRA (S2-Attn, G = N/4) + PI": 0.25}
    if args.compare_full:
        variants["LoRA + embed/norm + PI, full attention"] = None
    ext_lengths = [length for length in lengths if length >= l0]
    for name, ratio in variants.items():
        print(f"extending: {name}, contexts {ext_lengths[0]}..{target} ({args.extend_steps} steps)")
        model = extended(ratio)
        n, total = peftkit.trainable_parameters(model)
        secs = train(model, args.extend_steps, ext_lengths, args.batch, 2e-3, seed=1)
        print(f"  {secs:.0f} s, {n} of {total} parameters trained")
        rows[name] = accuracy(model, samples)

    print(
        f"\nexact-match passkey retrieval (full attention at inference), {args.eval} samples "
        f"per length, needle depth uniform; total {time.perf_counter() - t0:.0f} s\n"
    )
    print("| model | " + " | ".join(str(length) for length in eval_lengths) + " |")
    print("|---|" + "---|" * len(eval_lengths))
    for name, acc in rows.items():
        print(f"| {name} | " + " | ".join(f"{acc[length]:.2f}" for length in eval_lengths) + " |")


if __name__ == "__main__":
    main()
