"""W4, whole-model part: a LongLoRA training step of a tiny Llama, S2-Attn vs full causal SDPA.

The W1 Llama (hidden 512, 4 layers, 8 heads, MLP 1408, vocab 4096; fp32, 2 threads), batch 1 at
4,096 and 8,192 tokens, adapted with ``LongLoraConfig(r=8)`` (LoRA on q/k/v/o, embeddings and
norms trained) twice: ``group_size_ratio=0.25`` (S2-Attn, G = N/4) and ``group_size_ratio=None``
(the model's own causal SDPA). Everything else is identical, so the difference is the attention.
One step = forward with labels, backward, AdamW step. The two variants are interleaved (A B A B …)
after the warm-up; the time ratio is the median of per-round ratios with its quartiles. Saved
activations: the distinct storages autograd saves during one forward (``bench/common.py``).

    PYTHONPATH=src python bench/w4_model.py [--seq 4096 8192] [--rounds 5] [--warmup 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Step,
    interleaved,
    ratio_stats,
    saved_activation_bytes,
    w1_batch,
    w1_model,
    write_results,
)

import peftkit

VARIANTS = {"full": None, "s2": 0.25}  # variant -> group_size_ratio


def build(ratio: float | None) -> torch.nn.Module:
    model = w1_model(seed=0)
    peftkit.adapt(model, peftkit.LongLoraConfig(r=8, group_size_ratio=ratio))
    return model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--saved-only", action="store_true", help="skip the timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, fp32, W1 Llama, batch 1, "
        f"LongLoRA r=8 (q/k/v/o + embed/norm), {args.rounds} interleaved rounds after "
        f"{args.warmup} warm-up\n"
    )
    print(
        "| N | G | attention | step s (median) | step / full, median [q1, q3] | saved MiB "
        "| saved / full |"
    )
    print("|---|---|---|---|---|---|---|")
    out: list[dict[str, object]] = []
    for n in args.seq:
        ids = w1_batch(batch=1, seq=n)
        models = {name: build(ratio) for name, ratio in VARIANTS.items()}
        saved = {
            name: saved_activation_bytes(m, lambda m=m, ids=ids: m(input_ids=ids, labels=ids))
            for name, m in models.items()
        }
        times: dict[str, list[float]] = {name: [float("nan")] for name in models}
        if not args.saved_only:
            steps = {name: Step(m, ids) for name, m in models.items()}
            times = interleaved(steps, rounds=args.rounds, warmup=args.warmup)
        stats = ratio_stats(times, "full")
        for name, ratio in VARIANTS.items():
            med, q1, q3 = stats[name]
            group = "-" if ratio is None else str(int(n * ratio))
            print(
                f"| {n} | {group} | {name} | {statistics.median(times[name]):.2f} "
                f"| {med:.3f} [{q1:.3f}, {q3:.3f}] | {saved[name] / 2**20:.1f} "
                f"| {saved[name] / saved['full']:.3f} |",
                flush=True,
            )
            out.append({"tokens": n, "attention": name, "step_seconds_median":
                        statistics.median(times[name]), "step_over_full": [med, q1, q3],
                        "saved_over_full": saved[name] / saved["full"]})
        del models
    write_results("w4_model", out, notes=f"LongLoRA step, W1 Llama, {args.rounds} rounds",
                  units={"step_over_full": "median, q1, q3 of the per-round time ratio to full"})


if __name__ == "__main__":
    main()
