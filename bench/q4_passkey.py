"""Q4: passkey retrieval in miniature — LongLoRA extends a small Llama from 256 to 1,024 tokens.

Data. "Text" is random tokens in copy blocks (h tokens, then the same h again, h drawn per
sequence in 4..12): every copied token after a block's first is predictable by induction, a dense
signal that stays local (inside S2's groups). A passkey sample is such text over filler symbols
only, with a needle ``M k1 k2 k3 k4`` (four distinct key symbols) at a uniform depth and
``M k1 k2 k3 k4`` again at the end; the marker and keys occur nowhere else, so retrieving the
four keys at the end needs attention from the end back to the needle.

1. **Pre-train** a small Llama from scratch (hidden 64, 2 layers, 4 heads, vocab 128, RoPE θ 10⁴)
   at contexts ``L0/8 .. L0`` (L0 = 256), alternating text batches and passkey batches (loss on
   the copies and on the four keys).
2. **Extend** with LongLoRA to ``4 · L0``: ``LongLoraConfig(r=8, context_factor=4)`` (linear
   position interpolation; LoRA on q/k/v/o; embeddings and norms trained in full), S2-Attn with
   G = N/4 while training, at contexts ``L0 .. 4 · L0``, on text and passkey samples whose needle
   lies within the last N/8 tokens: the reach of the shifted heads' last group (G/2), the only
   retrieval distance a 2-layer model can learn under S2 (a deep model relays information across
   groups; 2 layers cannot). Longer retrievals are never trained at the new lengths and are
   tested zero-shot. The same run with full attention while training is the comparison row.
   (Extending on text alone, as the paper does on RedPajama, loses the passkey in this miniature
   for both attentions: local copies do not keep long-range retrieval alive.)
3. **Evaluate** with full attention (eval mode) at each context length: exact match of all four
   keys under greedy decoding (equivalently: every teacher-forced argmax right), needle depth
   uniform, the same fixed samples for every model.

Rows: the pre-trained model as is; with position interpolation but no fine-tuning; extended with
LongLoRA (S2-Attn); extended with full attention (skip with ``--no-full``). Two tables: needle
depth uniform, and needle within the last N/8 tokens (the distance trained while extending).
Defaults: 2,000 pre-training and 800 extension steps, 100 samples per length; about 6 minutes
on 2 quiet CPU cores. ``--base FILE`` caches the pre-trained model between runs.

    PYTHONPATH=src python bench/q4_passkey.py
    PYTHONPATH=src python bench/q4_passkey.py --pretrain-steps 800 --extend-steps 200 --eval 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

import peftkit  # noqa: E402

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


def _copy_blocks(n: int, length: int, low: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random tokens from ``[low, VOCAB)`` laid out in copy blocks: h tokens, then the same h
    tokens again (h drawn per sequence, so matching content, not a fixed offset, predicts the
    copy). Returns the ids and the copy's source index, both (n, length)."""
    idx = torch.arange(length)  # (L,)
    half = torch.randint(HALF[0], HALF[1] + 1, (n, 1), generator=g)  # (n, 1)
    second = (idx % (2 * half)) >= half  # (n, L): in a block's second half
    src = torch.where(second, idx - half, idx)  # (n, L)
    x = torch.randint(low, VOCAB, (n, length), generator=g).gather(1, src)  # (n, L)
    return x, src


def _copied(x: Tensor, src: Tensor) -> Tensor:
    """(n, L): tokens predictable by induction: a copy whose context token was copied too."""
    idx = torch.arange(x.shape[1])
    prev = x.gather(1, (src - 1).clamp_min(0))  # (n, L)
    out = (src < idx) & (src > 0) & (x == x.gather(1, src)) & (x.roll(1, dims=1) == prev)
    out[:, 0] = False
    return out


def text_batch(n: int, length: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """ "Plain text": copy blocks over every token, the marker and key symbols included;
    supervised on the copies. ``(ids, supervised)``, both (n, length)."""
    x, src = _copy_blocks(n, length, MARK, g)
    return x, _copied(x, src)


def passkey_batch(
    n: int, length: int, g: torch.Generator, near: int | None = None
) -> tuple[Tensor, Tensor]:
    """A passkey sample: copy-block filler over the filler symbols only, a needle ``M k1..k4``
    (four distinct key symbols) at a uniform depth (with ``near``: within the last ``near``
    tokens), and ``M k1..k4`` last, so the marker and keys occur nowhere else. Supervised: the
    copies and the four key tokens at the end. ``(ids, supervised)``, both (n, length)."""
    x, src = _copy_blocks(n, length, FILLER0, g)
    keys = torch.stack([torch.randperm(KEYS, generator=g)[:K] for _ in range(n)]) + KEY0  # (n, K)
    block = torch.cat([torch.full((n, 1), MARK), keys], dim=1)  # (n, K + 1)
    last = length - 2 * (K + 1)  # the deepest needle start that leaves room for the query
    first = 0 if near is None else max(0, length - near)
    depth = torch.randint(first, last + 1, (n, 1), generator=g)  # (n, 1)
    x.scatter_(1, depth + torch.arange(K + 1), block)
    x[:, -(K + 1) :] = block
    supervised = _copied(x, src)
    supervised[:, -(K + 1) :] = False
    supervised[:, -K:] = True
    return x, supervised


def passkey_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Logits that predict the last K tokens (the passkey): (n, K, V)."""
    logits: Tensor = model(input_ids=x, use_cache=False).logits
    return logits[:, -(K + 1) : -1]


def train(
    model: nn.Module,
    steps: int,
    lengths: list[int],
    batch: int,
    lr: float,
    seed: int,
    near: float | None = None,
) -> float:
    """AdamW on the supervised tokens, lr warm-up then cosine decay; returns seconds spent.
    Batches alternate :func:`text_batch` and :func:`passkey_batch` (needles within the last
    ``near · N`` tokens when ``near`` is set)."""
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
        if (step // len(lengths)) % 2:
            x, supervised = passkey_batch(
                n, length, g, None if near is None else int(near * length)
            )
        else:
            x, supervised = text_batch(n, length, g)
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
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--extend-steps", type=int, default=800)
    parser.add_argument("--eval", type=int, default=100, help="samples per context length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-full", action="store_true", help="skip the comparison extension with full attention"
    )
    parser.add_argument("--base", help="cache file of the pre-trained model (read if present)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    l0, target = args.l0, args.l0 * args.factor
    eval_lengths = list(range(l0 // 2, target + 1, l0 // 2))
    g = torch.Generator().manual_seed(1234)
    samples = {length: passkey_batch(args.eval, length, g) for length in eval_lengths}
    near = {length: passkey_batch(args.eval, length, g, length // 8) for length in eval_lengths}
    t0 = time.perf_counter()

    pre_lengths = [l0 // 8, l0 // 4, l0 // 2, l0]
    base = tiny_llama(l0)
    if args.base and Path(args.base).is_file():
        base.load_state_dict(torch.load(args.base))
        print(f"pre-trained model read from {args.base}")
    else:
        print(f"pre-training at contexts {pre_lengths} ({args.pretrain_steps} steps)", flush=True)
        # Note: 16 sequences of l0 tokens per step (more, shorter ones at shorter contexts).
        secs = train(base, args.pretrain_steps, pre_lengths, 16, 3e-3, seed=0)
        print(f"  {secs:.0f} s", flush=True)
        if args.base:
            torch.save(base.state_dict(), args.base)
    rows = {f"pre-trained at {l0}, no extension": (accuracy(base, samples), accuracy(base, near))}
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def extended(ratio: float | None) -> nn.Module:
        model = tiny_llama(l0)
        model.load_state_dict(state)
        config = peftkit.LongLoraConfig(r=8, group_size_ratio=ratio, context_factor=args.factor)
        return peftkit.adapt(model, config)

    pi = extended(0.25)
    rows[f"+ position interpolation x{args.factor}, no fine-tuning"] = (
        accuracy(pi, samples),
        accuracy(pi, near),
    )
    variants: dict[str, float | None] = {"LongLoRA: S2-Attn (G = N/4) + PI, fine-tuned": 0.25}
    if not args.no_full:
        variants["same with full attention in fine-tuning"] = None
    ext_lengths = list(range(l0, target + 1, l0 // 4))
    for name, ratio in variants.items():
        print(
            f"extending ({name}) at contexts {l0}..{target} ({args.extend_steps} steps; "
            "needles only within the last N/8 tokens)",
            flush=True,
        )
        model = extended(ratio)
        n, total = peftkit.trainable_parameters(model)
        # Note: 8 sequences of 4 * l0 tokens per step. Needles sit within the last N/8 tokens
        # (G/2, the shifted heads' last group), the only distance a 2-layer model can retrieve
        # under S2 (a deep model relays across groups; 2 layers cannot): longer retrievals are
        # never trained at the new lengths, for either attention, and are tested zero-shot.
        secs = train(model, args.extend_steps, ext_lengths, 8, 2e-3, seed=1, near=1 / 8)
        print(f"  {secs:.0f} s, {n:,} of {total:,} parameters trained", flush=True)
        rows[name] = (accuracy(model, samples), accuracy(model, near))

    print(
        f"\nexact-match passkey retrieval, full attention at inference, {args.eval} samples per "
        f"length; total {time.perf_counter() - t0:.0f} s"
    )
    for col, title in ((0, "needle depth uniform"), (1, "needle within the last N/8 tokens")):
        print(f"\n{title}\n")
        print("| model | " + " | ".join(str(length) for length in eval_lengths) + " |")
        print("|---|" + "---|" * len(eval_lengths))
        for name, accs in rows.items():
            acc = accs[col]
            print(f"| {name} | " + " | ".join(f"{acc[n]:.2f}" for n in eval_lengths) + " |")
    out = [{"model": name, "needle": needle, "exact_match": {str(n): accs[col][n]
                                                             for n in eval_lengths}}
           for name, accs in rows.items()
           for col, needle in ((0, "uniform"), (1, "last N/8 tokens"))]
    write_results("q4", out, notes=f"{args.eval} samples per length",
                  units={"exact_match": "fraction of samples, by context length in tokens"})


if __name__ == "__main__":
    main()
