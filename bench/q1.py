"""Q1 — the default task's quality, per method (BENCHMARKS.md, "Quality").

all-MiniLM-L6-v2 on the VADER movie-review snippets (binary sentiment; 1,000 held out, 500 dev).
Per method: 100 steps x 32 (dynamic padding, max length 64), AdamW at a constant lr, classifier head
trained in full. The lr is chosen from a small fixed grid by dev accuracy after one seed-0 run per
lr; that run's model is then scored on the test split, and one more run at the chosen lr gives
seed 1. Also recorded: trainable parameters, the median step time of the two chosen-lr runs, and
the bytes autograd saves for backward on a fixed 32 x 64 batch.

    python bench/q1.py lora full                       # appends rows to bench/q1_results.md
    python bench/q1.py lora:use_rslora=true            # any config field: METHOD:KEY=VALUE,...
    python bench/q1.py qlora loraplus                  # LoRA on an NF4 base; LoRA+ (ratio 16)
    python bench/q1.py lora --steps 5 --results /tmp/smoke.md   # a smoke run

Runs go through peftkit.train, the loop of ``peftkit train``: the seed-s run at lr x is the run
``peftkit train --lr x --seed s`` makes. One method costs about 4 trainings and 5 evaluations
(4-5 minutes on a quiet 2-core machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import saved_activation_bytes, write_results  # noqa: E402

import peftkit  # noqa: E402
from peftkit import train as T  # noqa: E402
from peftkit.data import minilm_path, vader  # noqa: E402

STEPS, BATCH, MAX_LENGTH, SEEDS = 100, 32, 64, (0, 1)
TARGETS = ("query", "value")
HEAD = ("classifier",)
# Constant learning rates tried on the dev split. Full fine-tuning moves 22.7 M pretrained weights
# and wants a much smaller step than an adapter starting from zero. Method issues may add a row.
GRIDS: dict[str, tuple[float, ...]] = {
    "full": (2e-5, 5e-5, 1e-4),
    # VeRA trains only two scaling vectors per layer; its paper uses learning rates ~10x LoRA's.
    "vera": (5e-3, 1e-2, 2e-2),
    # LoRA+ at ratio 16 runs B at 16 x lr: the adapter grid diverges from lr 2e-3 on (measured).
    "loraplus": (1e-4, 2e-4, 5e-4),
    # AdaLoRA's E starts at zero and its A, B at N(0, 0.02²): on the adapter grid it chose the top
    # lr (5e-3; dev 0.50 at 1e-3), so its grid starts there.
    "adalora": (5e-3, 1e-2, 2e-2),
}
# Rows that are LoRA with a training-side change rather than a registry method of their own.
ALIASES: dict[str, dict[str, Any]] = {
    "qlora": {"quantize": True},  # LoRA on a frozen NF4 base (double quantization)
    "loraplus": {"loraplus_ratio": 16.0},  # LoRA+: B's lr 16 x A's (its paper's default)
}
ADAPTER_GRID = (1e-3, 2e-3, 5e-3)
RESULTS = Path(__file__).resolve().parent / "q1_results.md"
HEADER = """# Q1 results: all-MiniLM-L6-v2 on VADER movie reviews

Protocol (BENCHMARKS.md): {steps} steps x {batch}, dynamic padding, max length {max_length}, AdamW
at a constant lr chosen by dev accuracy (500 examples, seed 0) from a fixed grid, classifier head
trained in full, LoRA-family targets query/value; held-out accuracy on 1,000 test examples for
seeds 0 and 1 (seed spread is about +-0.03: compare the means). Step time is the median over the
two chosen-lr runs (absolute seconds: compare rows from one machine only). Saved activations:
bytes autograd keeps for backward on a fixed 32 x 64 batch (deterministic). Rows are appended by
`python bench/q1.py METHOD...`.

"""
COLUMNS = (
    "method",
    "trainable",
    "acc. seed 0",
    "acc. seed 1",
    "mean",
    "lr (dev acc. per lr)",
    "median step",
    "saved activations",
    "steps",
    "threads",
    "date",
)


@dataclass
class Variant:
    """A row: a registry method (or ``full``) with config fields from ``METHOD:KEY=VALUE,...``."""

    spec: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    quantize: bool = False
    loraplus_ratio: float | None = None

    @classmethod
    def parse(cls, spec: str) -> Variant:
        method, _, rest = spec.partition(":")
        options = dict(T.parse_option(o) for o in rest.split(",") if o.strip())
        if method in ALIASES:
            return cls(spec, "lora", options, **ALIASES[method])
        if method != "full" and method not in peftkit.METHODS:
            known = ", ".join(["full", *sorted(ALIASES), *sorted(peftkit.METHODS)])
            raise SystemExit(f"q1: unknown method {method!r}; choose from {known}")
        if method == "full" and options:
            raise SystemExit("q1: full fine-tuning takes no options")
        return cls(spec, method, options)

    def grid(self) -> tuple[float, ...]:
        return GRIDS.get(self.spec, GRIDS.get(self.method, ADAPTER_GRID))


@dataclass
class Data:
    tokenizer: Any
    train: T.Encoded
    dev: T.Encoded
    test: T.Encoded
    fixed: dict[str, torch.Tensor]


def load_data() -> Data:
    splits = vader(0)
    _, tokenizer = T.load_model(minilm_path(), T.CLASSIFY, label_names=splits.label_names)
    texts = [e.text for e in splits.train[:BATCH]]
    labels = [int(e.label or 0) for e in splits.train[:BATCH]]
    return Data(
        tokenizer,
        T.encode(tokenizer, splits.train, T.CLASSIFY, MAX_LENGTH),
        T.encode(tokenizer, splits.dev, T.CLASSIFY, MAX_LENGTH),
        T.encode(tokenizer, splits.test, T.CLASSIFY, MAX_LENGTH),
        T.fixed_batch(tokenizer, texts, MAX_LENGTH, T.CLASSIFY, labels),  # (32, 64)
    )


def alpha_2r(method: str, options: dict[str, Any]) -> float | None:
    """α = 2 × the rank in use: the rule Q1's published rows were measured with (the CLI's
    default before issue 17 made ``--alpha`` default to the config's constant)."""
    fields = {f.name: f for f in dataclasses.fields(peftkit.METHODS[method].config_cls)}
    if "lora_alpha" not in fields or "lora_alpha" in options:
        return None
    rank_field = "init_r" if "init_r" in fields else "r" if "r" in fields else None
    if rank_field is None:
        return None
    rank = options.get(rank_field, fields[rank_field].default)
    return 2 * rank if isinstance(rank, int) else None


def build(variant: Variant, seed: int, steps: int) -> nn.Module:
    """The model ``peftkit train --method ... --seed seed`` builds, before its first step."""
    torch.manual_seed(seed)
    model, _ = T.load_model(minilm_path(), T.CLASSIFY, label_names=("negative", "positive"))
    if variant.method == "full":
        return T.full_finetune(model)
    config = T.build_config(
        variant.method,
        target_modules=TARGETS,
        modules_to_save=HEAD,
        steps=steps,
        alpha=alpha_2r(variant.method, dict(variant.options)),
        options=variant.options,
    )
    if variant.quantize:
        T.quantize_base(model, HEAD)
    return peftkit.adapt(model, config)


def train_once(
    variant: Variant, data: Data, lr: float, seed: int, steps: int
) -> tuple[nn.Module, T.FitResult]:
    model = build(variant, seed, steps)
    optimizer = T.make_optimizer(model, lr, loraplus_ratio=variant.loraplus_ratio)
    fit = T.fit(
        model,
        data.train,
        task=T.CLASSIFY,
        steps=steps,
        batch_size=BATCH,
        optimizer=optimizer,
        seed=seed,
        desc=f"{variant.spec} lr={lr:g} seed={seed}",
    )
    return model, fit


def run_variant(variant: Variant, data: Data, steps: int) -> dict[str, Any]:
    dev: dict[float, float] = {}
    best: tuple[float, nn.Module, T.FitResult] | None = None
    for lr in variant.grid():
        model, fit = train_once(variant, data, lr, SEEDS[0], steps)
        dev[lr] = T.evaluate(model, data.dev, task=T.CLASSIFY, desc="dev")
        if best is None or dev[lr] > dev[best[0]]:
            best = (lr, model, fit)
        del model
    assert best is not None
    lr, model0, fit0 = best
    acc = [T.evaluate(model0, data.test, task=T.CLASSIFY, desc="test")]
    del model0
    step_times = list(fit0.step_seconds)
    for seed in SEEDS[1:]:
        model, fit = train_once(variant, data, lr, seed, steps)
        acc.append(T.evaluate(model, data.test, task=T.CLASSIFY, desc="test"))
        step_times += fit.step_seconds
        del model
    probe = build(variant, SEEDS[0], steps).train()
    saved = saved_activation_bytes(probe, lambda: probe(**data.fixed))
    trainable, _ = peftkit.trainable_parameters(probe)
    return {
        "variant": variant.spec,
        "trainable": trainable,
        "acc": acc,
        "lr": lr,
        "dev": dev,
        "step": statistics.median(step_times),
        "saved": saved,
        "steps": steps,
    }


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)


def row(r: dict[str, Any], threads: int) -> str:
    acc = r["acc"]
    dev = " / ".join(f"{lr:g}: {a:.3f}" for lr, a in r["dev"].items())
    cells = [
        r["variant"],
        _count(r["trainable"]),
        *(f"{a:.3f}" for a in acc),
        f"{sum(acc) / len(acc):.3f}",
        f"**{r['lr']:g}** ({dev})",
        f"{r['step']:.3f} s",
        f"{r['saved'] / 2**20:.1f} MiB",
        str(r["steps"]) + ("" if r["steps"] == STEPS else " (smoke, not Q1)"),
        str(threads),
        datetime.date.today().isoformat(),
    ]
    return "| " + " | ".join(cells) + " |"


Q1_UNITS = {
    "acc": "held-out accuracy (1,000 sentences), one value per seed (0, 1)",
    "dev": "dev accuracy (500 sentences) of the seed-0 run at each lr of the grid",
    "step_seconds": "median step time of the chosen-lr runs (absolute; compare one machine only)",
    "saved_mib": "MiB autograd saves for backward on a fixed 32 x 64 batch (deterministic)",
}


def json_row(r: dict[str, Any]) -> dict[str, Any]:
    """The row as ``bench/results/q1.json`` keeps it (exact counts, unrounded)."""
    return {
        "variant": r["variant"],
        "trainable": r["trainable"],
        "acc": r["acc"],
        "lr": r["lr"],
        "dev": {f"{lr:g}": a for lr, a in r["dev"].items()},
        "step_seconds": r["step"],
        "saved_mib": r["saved"] / 2**20,
        "steps": r["steps"],
    }


def append(path: Path, rows: Sequence[str]) -> None:
    if not path.is_file() or not path.read_text(encoding="utf-8").strip():
        head = HEADER.format(steps=STEPS, batch=BATCH, max_length=MAX_LENGTH)
        head += "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
        path.write_text(head, encoding="utf-8")
    with path.open("a", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("variants", nargs="+", help="lora, full, any registry method, METHOD:K=V,...")
    ap.add_argument("--steps", type=int, default=STEPS, help="100 is Q1; fewer is a smoke run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2, as BENCHMARKS.md)")
    ap.add_argument("--results", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    args = ap.parse_args(argv)
    variants = [Variant.parse(s) for s in args.variants]
    torch.set_num_threads(args.threads)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    started = time.perf_counter()
    data = load_data()
    for v in variants:
        t0 = time.perf_counter()
        result = run_variant(v, data, args.steps)
        line = row(result, args.threads)
        append(args.results, [line])  # each row as soon as it exists: a later crash loses none
        if args.steps == STEPS:  # smoke runs stay out of bench/results
            write_results("q1", [json_row(result)], units=Q1_UNITS, notes="one variant per run")
        print(f"{line}   [{time.perf_counter() - t0:.0f} s]", flush=True)
    print(
        f"\nappended {len(variants)} row(s) to {args.results} in "
        f"{time.perf_counter() - started:.0f} s"
    )
    print()
    print(args.results.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
