"""W2 (BENCHMARKS.md): NF4 quantize / dequantize of a 4096 x 4096 fp32 matrix vs bitsandbytes.

Median of 5 (after one warm-up), both libraries timed alternately in the same process, plus the
storage of a quantized linear against fp32. Prints a markdown table.

    PYTHONPATH=src python bench/w2_nf4.py [--compile] [--threads N] [--size 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

from peftkit.quant import NF4Linear, nf4_dequantize, nf4_quantize  # noqa: E402


def _median_pair(
    a: Callable[[], object], b: Callable[[], object] | None, repeats: int
) -> tuple[float, float]:
    a()
    if b is not None:
        b()
    ta, tb = [], []
    for _ in range(repeats):  # alternate, so load changes hit both sides alike
        t0 = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t0)
        if b is not None:
            t0 = time.perf_counter()
            b()
            tb.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb) if tb else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile path")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = torch.randn(args.size, args.size)
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnbf = None

    def bnb_q() -> object:
        return bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    q = nf4_quantize(w)
    rows = []
    tq, tq_b = _median_pair(lambda: nf4_quantize(w), bnb_q if bnbf else None, args.repeats)
    rows.append(("quantize (NF4, B=64, DQ)", tq, tq_b))
    if bnbf is not None:
        packed, state = bnb_q()
        bnb_dq: Callable[[], object] | None = lambda: bnbf.dequantize_4bit(packed, state)  # noqa: E731
    else:
        bnb_dq = None
    td, td_b = _median_pair(lambda: nf4_dequantize(q), bnb_dq, args.repeats)
    rows.append(("dequantize", td, td_b))
    if args.compile:
        t0 = time.perf_counter()
        nf4_dequantize(q, compile=True)
        warm = time.perf_counter() - t0
        tc, tc_b = _median_pair(lambda: nf4_dequantize(q, compile=True), bnb_dq, args.repeats)
        rows.append((f"dequantize, torch.compile (first call {warm:.0f} s)", tc, tc_b))

    print(
        f"W2: {args.size} x {args.size} fp32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}\n"
    )
    print("| operation | peftkit (ms) | bitsandbytes (ms) | ratio |")
    print("|---|---|---|---|")
    out: list[dict[str, object]] = []
    for name, ours, theirs in rows:
        print(f"| {name} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | {ours / theirs:.2f}x |")
        out.append({"operation": name, "peftkit_ms": ours * 1e3, "bitsandbytes_ms": theirs * 1e3,
                    "ratio": ours / theirs})

    n = w.numel()
    print("\n| storage | bytes | bits / param | vs fp32 |")
    print("|---|---|---|---|")
    print(f"| fp32 weight | {4 * n:,} | 32 | 1.000 |")
    for dq in (True, False):
        qq = q if dq else nf4_quantize(w, double_quant=False)
        print(
            f"| NF4{' + DQ' if dq else ''} (tensors of a bnb checkpoint) | {qq.nbytes:,} | "
            f"{qq.bits_per_param:.4f} | {qq.nbytes / (4 * n):.4f} |"
        )
        layer = NF4Linear.from_linear(
            torch.nn.Linear(args.size, args.size, bias=False), double_quant=dq
        )
        nbytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
        print(
            f"| NF4Linear state_dict{' (DQ)' if dq else ''} | {nbytes:,} | "
            f"{8 * nbytes / n:.4f} | {nbytes / (4 * n):.4f} |"
        )
        out.append({"operation": f"storage{' with double quantization' if dq else ''}",
                    "bits_per_param": qq.bits_per_param, "vs_fp32": qq.nbytes / (4 * n)})
    write_results("w2", out, notes=f"{args.size} x {args.size} fp32, median of {args.repeats}",
                  units={"ratio": "peftkit time / bitsandbytes time, same process"})


if __name__ == "__main__":
    main()
