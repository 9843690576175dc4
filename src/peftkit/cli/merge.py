"""``peftkit merge``: write a merged model folder that transformers loads, after checking that
merged and adapted logits agree on a few probe sentences."""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

from .. import train as T
from ..inject import merge_and_unload
from .common import add_adapter_args, new_output_dir, rebuild

# Sentences for the merge check: any text will do, the check compares two models on it.
PROBE_TEXTS = (
    "A warm, funny and beautifully acted film.",
    "Dull, predictable and far too long.",
    "The plot",
    "It is neither good nor bad, just there, like a screensaver with a soundtrack.",
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("merge", help="write a merged model folder that transformers loads")
    add_adapter_args(p)
    p.add_argument("--output", required=True, help="a new folder for the merged model")
    p.add_argument("--task", choices=T.TASKS, help="(default: the training run's)")
    p.add_argument("--atol", type=float, default=1e-4, help="merged vs adapted logits (1e-4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = new_output_dir(args.output)
    model, tokenizer, _, _, _ = rebuild(args)
    enc = tokenizer(list(PROBE_TEXTS), padding=True, return_tensors="pt")
    probe = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # (4, T)
    # Raises (so nothing is written) when merged and adapted logits differ on the probe.
    merged: Any = merge_and_unload(model, probe=probe, atol=args.atol)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"checked    merged == adapted logits on a {tuple(probe['input_ids'].shape)} probe")
    print(f"wrote      {out}/ (a plain {type(merged).__name__} folder for transformers)")
    return 0
