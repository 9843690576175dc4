"""``peftkit export``: the adapter as a plain PEFT LoRA folder (``export_lora``) or, with
``--format gguf``, as a llama.cpp LoRA adapter file (``export_gguf``)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from .. import train as T
from ..state import export_lora
from .common import CliError, add_adapter_args, read_info, rebuild
from .inspect import summarize_adapter


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="write the adapter as a plain PEFT LoRA (export_lora)")
    add_adapter_args(p)
    p.add_argument("--output", required=True, help="folder for the LoRA (gguf: a .gguf file)")
    p.add_argument(
        "--format",
        choices=("peft", "gguf"),
        default="peft",
        help="peft: a PEFT LoRA folder; gguf: a llama.cpp LoRA adapter file (export_gguf)",
    )
    p.add_argument("--rank", type=int, help="truncate to this rank where the method allows")
    p.add_argument("--task", choices=T.TASKS, help="(default: the training run's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        return _export_gguf(args)
    model, _, _, _, _ = rebuild(args)
    out = export_lora(model, args.output, rank=args.rank)
    info = Path(args.adapter) / T.TRAIN_INFO
    if info.is_file():
        shutil.copyfile(info, out / T.TRAIN_INFO)
    summary = summarize_adapter(out)
    print(f"wrote      {out}/ (plain PEFT LoRA, ranks {summary['rank_summary']})")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from ..gguf_export import export_gguf

    if Path(args.output).suffix != ".gguf":  # before the model loads
        raise CliError(f"{args.output}: a GGUF adapter file name must end in .gguf")
    # llama.cpp runs generative models: a folder that names no task is a causal LM's adapter.
    args.task = args.task or read_info(Path(args.adapter)).get("task") or T.CAUSAL_LM
    model, _, _, _, _ = rebuild(args)
    out = export_gguf(model, args.output, rank=args.rank)
    print(f"wrote      {out} (llama.cpp LoRA adapter; load it beside the base model's GGUF)")
    return 0
