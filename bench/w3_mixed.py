"""W3: mixed-adapter batches, against the base model and PEFT's ``adapter_names=`` path.

The W1 Llama (hidden 512, 4 layers) in eval mode with 8 LoRA adapters of r 16 on all seven
projections (non-zero B), a batch of 8 rows, row i through adapter i:

* prefill: one forward of 8 × 256 tokens (no KV cache);
* generate: 32 new greedy tokens from 8 × 64 prompts (KV cache on).

Every variant is timed interleaved in one process and reported as the median ratio to the base
model (a separate copy with no adapters) with quartiles. Variants: ``mixed`` (``peftkit.route``),
``single`` (one active adapter, no route), ``peft-mixed`` / ``peft-single`` (PEFT 0.21.2 with the
same weights), ``many`` (64 adapters loaded, 8 used), ``ranks`` (ranks 4, 8, 16, 64 twice each,
stacked in rank groups), ``ranks-padded`` (the same, padded to rank 64 in one stack), ``dora``
(8 DoRA adapters), ``r128`` (one adapter of rank 8 · 16 = 128, active, no route: it
reads the same factor bytes as the eight adapters of rank 16, so it is the floor for ``mixed``
when every row uses a different adapter). Mixed outputs are checked against PEFT's and against
one row at a time before timing.

    python bench/w3_mixed.py [--rounds 5] [--only prefill|generate] [VARIANT ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    W1_TARGETS,
    interleaved,
    ratio_stats,
    w1_batch,
    w1_model,
    write_results,
)

import peftkit  # noqa: E402
from peftkit import routing  # noqa: E402

ROWS = 8


def names_for(n: int) -> list[str]:
    return ["default"] + [f"a{i}" for i in range(1, n)]


def adapted(n: int, ranks: list[int] | None = None, dora: bool = False) -> nn.Module:
    """The W1 model with ``n`` LoRA adapters, every B non-zero (seeded)."""
    model = w1_model(0).eval()
    model.config.use_cache = True
    g = torch.Generator().manual_seed(1)
    for i, name in enumerate(names_for(n)):
        r = ranks[i % len(ranks)] if ranks else 16
        cfg = peftkit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=W1_TARGETS, use_dora=dora)
        peftkit.adapt(model, cfg, name=name)
    with torch.no_grad():
        for _, a in peftkit.adapters(model):
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.02)
    return model.requires_grad_(False)


def peft_copy(ours: nn.Module, folder: Path) -> nn.Module:
    """PEFT's model with the same adapters, loaded from peftkit's multi-adapter folder."""
    from peft import PeftModel

    peftkit.save_adapter(ours, folder)
    base = w1_model(0).eval()
    base.config.use_cache = True
    pm = PeftModel.from_pretrained(base, str(folder))
    for name in names_for(ROWS)[1:]:
        pm.load_adapter(str(folder / name), adapter_name=name)
    return pm.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("variants", nargs="*")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", choices=["prefill", "generate"])
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base = w1_model(0).eval().requires_grad_(False)
    base.config.use_cache = True
    mixed = adapted(ROWS)
    rows = names_for(ROWS)
    tmp = Path(tempfile.mkdtemp(prefix="w3-"))
    models: dict[str, tuple[nn.Module, Any]] = {
        "base": (base, None),
        "mixed": (mixed, rows),
        "single": (mixed, "single"),
        "peft-mixed": (peft_copy(mixed, tmp / "peft"), ("peft", rows)),
        "peft-single": (None, ("peft", None)),  # filled below: the same PEFT model
        "many": (adapted(64), names_for(64)[::8]),
        "ranks": (adapted(ROWS, ranks=[4, 8, 16, 64]), rows),
        # the same, every adapter padded to rank 64 in one stack (no rank groups)
        "ranks-padded": (adapted(ROWS, ranks=[4, 8, 16, 64]), rows),
        "dora": (adapted(ROWS, dora=True), rows),
        # the same factor bytes as the 8 adapters of r 16, as one adapter of r 8·16 = 128 with
        # no route: the floor set by reading every adapter's factors once per step
        "r128": (adapted(1, ranks=[ROWS * 16]), "single"),
    }
    models["peft-single"] = (models["peft-mixed"][0], ("peft", None))
    wanted = args.variants or list(models)
    wanted = ["base"] + [v for v in wanted if v != "base"]
    unknown = [v for v in wanted if v not in models]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(models)}")

    prefill_ids = w1_batch(ROWS, 256)
    prompts = w1_batch(ROWS, 64)

    def runner(name: str, gen: bool) -> Callable[[], Any]:
        model, how = models[name]
        x = prompts if gen else prefill_ids

        def call(m: nn.Module, **kw: Any) -> Any:
            if gen:
                return m.generate(
                    x, max_new_tokens=32, min_new_tokens=32, do_sample=False, use_cache=True,
                    pad_token_id=0, **kw,
                )
            return m(input_ids=x, use_cache=False, **kw).logits

        if how is None:
            return lambda: call(model)
        if how == "single":
            return lambda: call(model)  # the default adapter active, no route
        if isinstance(how, tuple):  # PEFT
            names = how[1]
            return (lambda: call(model, adapter_names=names)) if names else (lambda: call(model))

        def routed() -> Any:
            spread = routing.RANK_SPREAD
            if name == "ranks-padded":
                routing.RANK_SPREAD = 10**9  # read when a layer's stack is built (then cached)
            try:
                with peftkit.route(model, how):
                    return call(model)
            finally:
                routing.RANK_SPREAD = spread

        return routed

    with torch.no_grad():
        # correctness first: ours mixed == PEFT mixed == one row at a time
        a = runner("mixed", False)()
        b = runner("peft-mixed", False)()
        print(f"check: mixed vs PEFT mixed, max |Δlogit| = {(a - b).abs().max().item():.2e}")
        peftkit.set_adapter(mixed, rows[3])
        one = mixed(input_ids=prefill_ids[3:4], use_cache=False).logits
        peftkit.set_adapter(mixed, "default")
        d = (a[3:4] - one).abs().max().item()
        print(f"check: row 3 mixed vs alone, max |Δlogit| = {d:.2e}")
        ga = runner("mixed", True)()
        gb = runner("peft-mixed", True)()
        print(f"check: mixed generate == PEFT mixed generate: {torch.equal(ga, gb)}")
        rows_out: list[dict[str, Any]] = []
        for phase in ("prefill", "generate"):
            if args.only and phase != args.only:
                continue
            steps = {n: runner(n, phase == "generate") for n in wanted}
            times = interleaved(steps, rounds=args.rounds, warmup=1)
            stats = ratio_stats(times, "base")
            base_s = sorted(times["base"])[len(times["base"]) // 2]
            print(f"\n{phase}: base {base_s:.3f} s per call, {args.rounds} interleaved rounds")
            print("| variant | time / base, median [q1, q3] |")
            print("|---|---|")
            for n in wanted:
                med, q1, q3 = stats[n]
                print(f"| {n} | {med:.3f} [{q1:.3f}, {q3:.3f}] |")
                rows_out.append({"phase": phase, "variant": n, "ratio_to_base": med, "q1": q1,
                                 "q3": q3, "base_seconds": base_s})
            if "many" in times and "mixed" in times:
                # the 64-loaded target is against 8 loaded, so pair those two rounds directly
                med, q1, q3 = ratio_stats(times, "mixed")["many"]
                print(f"| many / mixed (64 loaded vs 8, 8 used) | {med:.3f} [{q1:.3f}, {q3:.3f}] |")
                rows_out.append({"phase": phase, "variant": "many/mixed", "ratio_to_mixed": med,
                                 "q1": q1, "q3": q3})
    write_results(
        "w3", rows_out,
        units={"ratio_to_base": "time / base model's time, median of per-round ratios",
               "ratio_to_mixed": "time / mixed's time (8 adapters loaded), per-round median",
               "base_seconds": "s per call of the base model (median)"},
        notes=f"{args.rounds} interleaved rounds; W1 Llama, 8 rows, r 16 on all seven projections",
    )


if __name__ == "__main__":
    main()
