"""``peftkit eval``: accuracy or perplexity of a base model plus an adapter; with ``--ranks``,
DyLoRA's metric at every rank 1..r (written to ``ADAPTER/rank_curve.json``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import train as T
from ..core import adapters
from ..data import Example, load_file, split_dataset
from .common import (
    RANK_CURVE,
    USER_DATA_TEST_FRACTION,
    VADER,
    CliError,
    add_adapter_args,
    metric_name,
    rebuild,
    vader_splits,
    write_json,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="accuracy or perplexity of a base model plus an adapter")
    add_adapter_args(p)
    p.add_argument(
        "--data", help="evaluate on this whole file (default: the training run's held-out split)"
    )
    p.add_argument("--task", choices=T.TASKS, help="(default: the training run's)")
    p.add_argument("--max-length", type=int, help="(default: the training run's, else 64)")
    p.add_argument("--eval-batch-size", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument(
        "--ranks",
        action="store_true",
        help=f"DyLoRA: evaluate at every rank 1..r; writes ADAPTER/{RANK_CURVE} (inspect --plot)",
    )
    p.set_defaults(func=run)


def _eval_data(
    args: argparse.Namespace, info: dict[str, Any], task: str, label_names: Sequence[str] | None
) -> tuple[tuple[Example, ...], tuple[str, ...], str]:
    """``(examples, label_names, description)`` for ``peftkit eval``: the whole ``--data`` file,
    else the held-out split the adapter was trained against (recorded in peftkit_train.json)."""
    names = tuple(label_names) if label_names else None
    if args.data is not None:
        ds = load_file(args.data, task=task, label_names=names)
        return ds.examples, ds.label_names, f"{args.data} ({len(ds.examples):,} examples)"
    source = info.get("data", VADER)
    if source == VADER:
        s = vader_splits()
        return s.test, s.label_names, f"VADER held-out test split ({len(s.test):,} examples)"
    if info.get("eval_data"):
        ds = load_file(info["eval_data"], task=task, label_names=names)
        return ds.examples, ds.label_names, f"{info['eval_data']} ({len(ds.examples):,} examples)"
    ds = load_file(source, task=task, label_names=names)
    s = split_dataset(ds.examples, 0, USER_DATA_TEST_FRACTION, label_names=ds.label_names)
    return s.test, s.label_names, f"{source}, held-out split ({len(s.test):,} examples)"


def run(args: argparse.Namespace) -> int:
    model, tokenizer, info, task, labels = rebuild(args)
    examples, _, desc = _eval_data(args, info, task, labels if task == T.CLASSIFY else None)
    max_length = args.max_length or int(info.get("max_length") or 64)
    enc = T.encode(tokenizer, examples, task, max_length)
    metric = metric_name(task)
    if args.ranks:
        return _eval_ranks(args, model, enc, task, desc)
    value = T.evaluate(model, enc, task=task, batch_size=args.eval_batch_size)
    print(f"data       {desc}")
    print(f"{metric}   {value:.4f}")
    return 0


def _eval_ranks(args: argparse.Namespace, model: Any, enc: T.Encoded, task: str, desc: str) -> int:
    """DyLoRA: the metric at every rank 1..r of one adapter (``set_rank``), printed and written
    to ``ADAPTER/rank_curve.json`` for ``peftkit inspect --plot``."""
    from ..methods import dylora

    layers = [a for _, a in adapters(model) if isinstance(a, dylora.DyLoraLayer)]
    if not layers:
        raise CliError(f"--ranks needs a DyLoRA adapter; {args.adapter} is not one")
    metric = metric_name(task)
    curve: dict[str, float] = {}
    print(f"data       {desc}")
    print(f"rank  {metric}")
    for b in range(1, max(a.r for a in layers) + 1):
        dylora.set_rank(model, b)
        curve[str(b)] = T.evaluate(
            model, enc, task=task, batch_size=args.eval_batch_size, desc=f"rank {b}"
        )
        print(f"{b:>4}  {curve[str(b)]:.4f}")
        sys.stdout.flush()
    write_json(Path(args.adapter) / RANK_CURVE, {"metric": metric, "data": desc, "ranks": curve})
    print(f"wrote      {Path(args.adapter) / RANK_CURVE}")
    return 0
