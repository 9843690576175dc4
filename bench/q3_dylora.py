"""Q3 — DyLoRA: one training evaluated at every rank 1…r, against LoRA trained at r and truncated,
and LoRA trained separately at each rank (../shared/BENCHMARKS.md, Q3), on the default task:
all-MiniLM-L6-v2 on the VADER movie-review sentences, adapters on query/value, classifier trained,
``--steps`` × ``--batch`` (dynamic padding, max length 64), constant lr, held-out accuracy.

    python bench/q3_dylora.py                                  # the full run (2 seeds)
    python bench/q3_dylora.py --steps 2 --eval 64 --seeds 0    # a smoke run

Every model shares α (scale α/b at rank b, as DyLoRA). "LoRA-r truncated" keeps A[:b], B[:, :b] of
the rank-r LoRA at scale α/b (DyLoRA's convention) and at its trained scale α/r. Prints a markdown
table; cells are seed means with the per-seed values in brackets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_results  # noqa: E402

import peftkit  # noqa: E402
from peftkit.data import Example, minilm_path, vader  # noqa: E402
from peftkit.state import adapter_tensors  # noqa: E402

TARGETS = ["query", "value"]


def load_model(seed: int, device: str) -> nn.Module:
    from transformers import AutoModelForSequenceClassification, logging

    logging.set_verbosity_error()  # the new head's "missing keys" report, once per model
    torch.manual_seed(seed)  # the classifier head is new: its init follows the seed
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2)
    return model.to(device)


class Batches:
    """Tokenised batches: training order from ``torch.randperm`` seeded by the run's seed."""

    def __init__(self, max_length: int, device: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
        self.max_length, self.device = max_length, device

    def encode(self, rows: Sequence[Example]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [e.text for e in rows],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([e.label for e in rows])
        return {k: v.to(self.device) for k, v in enc.items()}


def train(
    model: nn.Module,
    data: Sequence[Example],
    batches: Batches,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> float:
    """``steps`` AdamW steps at constant ``lr`` with the method's hooks attached; seconds taken."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    peftkit.attach(opt, model)
    t0 = time.perf_counter()
    for step in range(steps):
        rows = [data[order[(step * batch + i) % len(order)]] for i in range(batch)]
        model(**batches.encode(rows)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


@torch.no_grad()
def accuracy(model: nn.Module, data: Sequence[Example], batches: Batches) -> float:
    model.eval()
    right = 0
    for i in range(0, len(data), 256):
        enc = batches.encode(data[i : i + 256])
        labels = enc.pop("labels")
        right += int((model(**enc).logits.argmax(-1) == labels).sum())
    return right / len(data)


def lora(r: int, alpha: float) -> peftkit.LoraConfig:
    return peftkit.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS, modules_to_save=["classifier"]
    )


def dylora(r: int, alpha: float, seed: int, frozen: bool) -> peftkit.DyLoraConfig:
    return peftkit.DyLoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=TARGETS,
        seed=seed,
        frozen=frozen,
        modules_to_save=["classifier"],
    )


@torch.no_grad()
def as_dylora(
    trained: nn.Module, args: argparse.Namespace, seed: int, scale: Callable[[int], float]
) -> Callable[[int], nn.Module]:
    """A DyLoRA model holding a trained rank-r LoRA: at rank b it computes
    (α/b)·B'[:, :b] A[:b] with B' = B · ``scale(b)``."""
    model = peftkit.adapt(load_model(seed, args.device), dylora(args.r, args.alpha, seed, False))
    ours, theirs = adapter_tensors(model), adapter_tensors(trained)
    for k, t in ours.items():
        t.copy_(theirs[k])
    b_full = {k: t.clone() for k, t in ours.items() if k.endswith("lora_B.weight")}

    def at(b: int) -> nn.Module:
        with torch.no_grad():
            for k, t in b_full.items():
                ours[k].copy_(t * scale(b))
        return peftkit.set_rank(model, b)

    return at


def run_seed(
    seed: int, args: argparse.Namespace, splits: object, batches: Batches
) -> dict[str, dict[int, float]]:
    train_set, test_set = splits.train, splits.test[: args.eval]  # type: ignore[attr-defined]
    kw = dict(steps=args.steps, batch=args.batch, lr=args.lr, seed=seed)
    out: dict[str, dict[int, float]] = {"dylora": {}, "trunc_b": {}, "trunc_r": {}, "lora_b": {}}
    ranks = range(1, args.r + 1)

    model = peftkit.adapt(
        load_model(seed, args.device), dylora(args.r, args.alpha, seed, args.frozen)
    )
    secs = train(model, train_set, batches, **kw)
    print(f"seed {seed}: DyLoRA trained in {secs:.0f} s", file=sys.stderr)
    for b in ranks:
        out["dylora"][b] = accuracy(peftkit.set_rank(model, b), test_set, batches)

    full = peftkit.adapt(load_model(seed, args.device), lora(args.r, args.alpha))
    train(full, train_set, batches, **kw)
    for key, scale in (("trunc_b", lambda b: 1.0), ("trunc_r", lambda b: b / args.r)):
        at = as_dylora(full, args, seed, scale)
        for b in ranks:
            out[key][b] = accuracy(at(b), test_set, batches)
    out["lora_b"][args.r] = accuracy(full, test_set, batches)
    for b in ranks[:-1]:
        model = peftkit.adapt(load_model(seed, args.device), lora(b, args.alpha))
        train(model, train_set, batches, **kw)
        out["lora_b"][b] = accuracy(model, test_set, batches)
        print(f"seed {seed}: LoRA r={b} done", file=sys.stderr)
    return out


def cell(values: list[float]) -> str:
    inner = ", ".join(f"{v:.3f}" for v in values)
    return f"{statistics.mean(values):.3f} ({inner})" if len(values) > 1 else f"{values[0]:.3f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--frozen", action="store_true", help="DyLoRA's frozen mode (official code)")
    ap.add_argument("--eval", type=int, default=None, help="first N held-out examples (all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    splits = vader(0)  # held-out set fixed by seed 0 (BENCHMARKS.md); runs vary by --seeds
    batches = Batches(args.max_length, args.device)
    results = [run_seed(s, args, splits, batches) for s in args.seeds]
    n_eval = len(splits.test[: args.eval])
    print(
        f"Q3: all-MiniLM-L6-v2 on VADER, {args.steps} steps x {args.batch}, lr {args.lr:g}, "
        f"alpha {args.alpha:g}, r {args.r}{', frozen' if args.frozen else ''}; held-out "
        f"accuracy on {n_eval} examples, seeds {args.seeds}"
    )
    print()
    print(
        f"| rank b | DyLoRA (one run) | LoRA r={args.r} truncated, α/b | LoRA r={args.r} "
        f"truncated, α/{args.r} | LoRA trained at b |"
    )
    print("|---|---|---|---|---|")
    for b in range(1, args.r + 1):
        cells = [
            cell([res[k][b] for res in results]) for k in ("dylora", "trunc_b", "trunc_r", "lora_b")
        ]
        print(f"| {b} | " + " | ".join(cells) + " |")
    keys = {"dylora": "dylora", "trunc_b": "lora_truncated_alpha_over_b",
            "trunc_r": "lora_truncated_alpha_over_r", "lora_b": "lora_trained_at_b"}
    rows = [{"rank": b, "seeds": args.seeds,
             **{name: [res[k][b] for res in results] for k, name in keys.items()}}
            for b in range(1, args.r + 1)]
    write_results("q3", rows, notes=f"{args.steps} steps x {args.batch}, lr {args.lr:g}, "
                  f"r {args.r}, {n_eval} held-out examples",
                  units={name: "held-out accuracy, one value per seed" for name in keys.values()})


if __name__ == "__main__":
    main()
