"""What a mixed batch costs inside ``peftkit serve``'s engine, step by step, in one process: a
decoding step of 16 rows (2 per adapter, rows in adapter order, under a frozen route, as the
engine runs it) against the same step of the base model, and a 64-token prefill through one
adapter (the engine's one-row route) against the base's. Pairs are timed back to back and
interleaved, so that machine load hits both; reports the median and the lowest per-pair ratio.

    python bench/serve_steps.py                # SmolLM2-135M-Instruct, 8 adapters of r 16
    python bench/serve_steps.py --pairs 60 --threads 1

Each decoding step starts from a copy of the same 64-token KV cache (the copy is not timed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from common import write_results  # noqa: E402
from serve import make_adapters  # noqa: E402

import peftkit  # noqa: E402
from peftkit.models import fetch_smollm2  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="a causal-LM folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, DynamicCache

    model_dir = Path(args.model) if args.model else fetch_smollm2()
    paths = make_adapters(model_dir, args.adapters, args.rank)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_dir).eval().requires_grad_(False)

    base, mixed = load(), load()  # the base without adapters: what the base workload runs
    names = [f"a{i}" for i in range(args.adapters)]
    for name, p in zip(names, paths, strict=True):
        peftkit.load_adapter(mixed, p, name=name)
    peftkit.set_adapter(mixed, [])
    rows = sorted(names[i % len(names)] for i in range(args.rows))  # adapter order, as served
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (args.rows, args.prompt_tokens), generator=g)
    last = torch.randint(100, 40000, (args.rows, 1), generator=g)

    def decode_step(model: torch.nn.Module) -> object:
        cache = DynamicCache(config=model.config)
        model(input_ids=prompts, cache=cache, use_cache=True)

        def step() -> float:
            c = copy.deepcopy(cache)
            t = time.perf_counter()
            model(input_ids=last, cache=c, use_cache=True)
            return time.perf_counter() - t

        return step

    def prefill(adapter: str | None) -> float:
        cache = DynamicCache(config=mixed.config)
        t = time.perf_counter()
        if adapter is None:
            base(input_ids=prompts[:1], cache=cache, use_cache=True, logits_to_keep=1)
        else:
            with peftkit.route(mixed, [adapter], frozen=True):
                mixed(input_ids=prompts[:1], cache=cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {k: [] for k in ("step base", "step mixed", "prefill base",
                                                    "prefill adapter")}
    with torch.no_grad():
        step_base, step_mixed = decode_step(base), None
        with peftkit.route(mixed, rows, frozen=True):
            step_mixed = decode_step(mixed)
            for i in range(args.pairs + 3):  # 3 warm-up pairs
                b, m = step_base(), step_mixed()  # type: ignore[operator]
                if i >= 3:
                    times["step base"].append(b)
                    times["step mixed"].append(m)
        for i in range(args.pairs + 3):
            b, m = prefill(None), prefill(names[i % len(names)])
            if i >= 3:
                times["prefill base"].append(b)
                times["prefill adapter"].append(m)
    out = []
    for what, num, den in (("decoding step", "step mixed", "step base"),
                           ("prefill", "prefill adapter", "prefill base")):
        ratios = [a / b for a, b in zip(times[num], times[den], strict=True)]
        med, floor = statistics.median(ratios), min(times[num]) / min(times[den])
        print(f"{what}: base {1e3 * statistics.median(times[den]):.1f} ms, with adapters "
              f"{1e3 * statistics.median(times[num]):.1f} ms (medians); per pair median "
              f"{med:.3f}, lowest {min(ratios):.3f}; min/min {floor:.3f}")
        out.append({
            "phase": what,
            "base_ms": 1e3 * statistics.median(times[den]),
            "adapters_ms": 1e3 * statistics.median(times[num]),
            "ratio_to_base": med,
            "ratio_lowest": min(ratios),
            "ratio_min_over_min": floor,
        })
    write_results(
        "serve_steps", out,
        units={"base_ms": "median ms", "adapters_ms": "median ms",
               "ratio_to_base": "median of per-pair ratios"},
        notes=f"{args.rows} rows over {args.adapters} adapters of r {args.rank}, "
              f"{args.prompt_tokens}-token prompts, {args.pairs} pairs, {args.threads} thread(s)",
    )


if __name__ == "__main__":
    main()
