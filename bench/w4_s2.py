"""W4, one-layer part: S2-Attn vs full causal SDPA at long context (BENCHMARKS.md).

One attention call, forward + backward, fp32, ``torch.set_num_threads(2)``: batch 1, 8 heads,
head_dim 64, group N/4, at 4,096 and 8,192 tokens. The variants are interleaved (A B C A B C ...)
after a warm-up; the time ratio is the median of per-round ratios, with its quartiles. Saved
activations are the bytes of the distinct storages autograd saves during one forward (each storage
counted once, by data pointer), followed by a backward. The score-pair column is the arithmetic
limit: (query, key) pairs scored, relative to full causal attention.

    PYTHONPATH=src python bench/w4_s2.py [--rounds 9] [--seq 4096 8192]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

from peftkit.attention import s2_attention  # noqa: E402

Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


def full_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def saved_bytes(fn: Attention, q: Tensor, k: Tensor, v: Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(q, k, v)
    torch.autograd.backward(out.sum())  # frees the graph, and the tensors the hook kept with it
    q.grad = k.grad = v.grad = None
    return sum(storages.values())


def step_seconds(fn: Attention, q: Tensor, k: Tensor, v: Tensor, grad: Tensor) -> float:
    start = time.perf_counter()
    out = fn(q, k, v)
    torch.autograd.backward(out, grad)
    elapsed = time.perf_counter() - start
    q.grad = k.grad = v.grad = None
    return elapsed


def score_pairs(n: int, group: int, heads: int, variant: str) -> int:
    """(query, key) pairs a causal variant scores, summed over heads."""

    def tri(s: int) -> int:
        return s * (s + 1) // 2

    if variant == "full":
        return heads * tri(n)
    plain = sum(tri(min(group, n - s)) for s in range(0, n, group))
    if variant == "s2 wrap":
        shifted = plain  # the roll form groups the rolled sequence like the plain half
    else:
        half = group // 2
        shifted = tri(min(half, n)) + sum(tri(min(group, n - s)) for s in range(half, n, group))
    return heads // 2 * (plain + shifted)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(
        f"torch {torch.__version__}, {args.threads} threads, fp32, batch {args.batch}, "
        f"{args.heads} heads, head_dim {args.head_dim}, group N/4, forward + backward, "
        f"{args.rounds} interleaved rounds after 1 warm-up\n"
    )
    print(
        "| N | G | attention | step ms (median) | step / full, median [q1, q3] "
        "| saved MiB | saved / full | score pairs / full |"
    )
    print("|---|---|---|---|---|---|---|---|")
    out: list[dict[str, object]] = []
    for n in args.seq:
        group = n // 4
        shape = (args.batch, args.heads, n, args.head_dim)
        q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape)
        variants: dict[str, Attention] = {
            "full": full_attention,
            "s2": functools.partial(s2_attention, group_size=group),
            "s2 wrap": functools.partial(s2_attention, group_size=group, wrap=True),
        }
        saved = {name: saved_bytes(fn, q, k, v) for name, fn in variants.items()}
        for fn in variants.values():  # warm-up
            step_seconds(fn, q, k, v, grad)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(step_seconds(fn, q, k, v, grad))
        full_pairs = score_pairs(n, group, args.heads, "full")
        for name in variants:
            ratios = [t / f for t, f in zip(times[name], times["full"], strict=True)]
            q1, med, q3 = quartiles(ratios)
            print(
                f"| {n} | {group} | {name} | {1e3 * statistics.median(times[name]):.0f} "
                f"| {med:.3f} [{q1:.3f}, {q3:.3f}] | {saved[name] / 2**20:.1f} "
                f"| {saved[name] / saved['full']:.3f} "
                f"| {score_pairs(n, group, args.heads, name) / full_pairs:.3f} |"
            )
            pairs = score_pairs(n, group, args.heads, name) / full_pairs
            out.append({
                "tokens": n, "group": group, "attention": name, "step_over_full": [med, q1, q3],
                "saved_over_full": saved[name] / saved["full"], "score_pairs_over_full": pairs,
            })
    write_results(
        "w4_s2", out, notes=f"one attention layer, {args.rounds} interleaved rounds",
        units={"step_over_full": "median, q1, q3 of the per-round time ratio to full SDPA"},
    )


if __name__ == "__main__":
    main()
