"""``peftkit serve``: an OpenAI-compatible server for a causal LM and many adapters.

    peftkit serve --adapter math=out/math --adapter code=out/code

The engine, the Starlette app and the uvicorn runner are ``peftkit.serve``'s; this module reads
the options, checks them, loads the model and starts the server. Bad options raise
``ValueError``/``OSError``, which ``peftkit.cli.main`` prints as one line.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .common import SERVED_MODEL_HELP, model_dir, quiet_transformers, set_threads

HOST = "127.0.0.1"
PORT = 8000


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server for a base model and many adapters",
        description="Serve a causal LM and its adapters with OpenAI's API (/v1/models, "
        "/v1/completions, /v1/chat/completions); the request's `model` names an adapter or the "
        "base. Requests for different adapters share each decoding step (continuous batching).",
    )
    p.add_argument("--model", help=SERVED_MODEL_HELP)
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an adapter folder served as NAME (repeatable)",
    )
    p.add_argument("--host", default=HOST, help=f"address to bind ({HOST}: this machine only)")
    p.add_argument("--port", type=int, default=PORT, help=f"({PORT}; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (16)")
    p.add_argument(
        "--api-key",
        help="require `Authorization: Bearer KEY` (default: $PEFTKIT_API_KEY, else no key)",
    )
    p.add_argument(
        "--allow-adapter-loading",
        action="store_true",
        help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter",
    )
    p.add_argument("--served-model-name", help="the base model's name in requests")
    p.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (1 MiB)"
    )
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: one per idle core)")
    p.set_defaults(func=run)


def _adapter_arg(text: str) -> tuple[str, str]:
    """``NAME=DIR``, or ``DIR`` (named after its folder)."""
    name, sep, path = text.partition("=")
    if not sep:
        path = text
        name = Path(text.rstrip("/")).name
    if not name or not path:
        raise ValueError(f"--adapter {text!r}: give NAME=DIR (or a folder, named after itself)")
    if not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"--adapter {text!r}: {path} is not a folder")
    return name, str(Path(path).expanduser())


def run(args: argparse.Namespace) -> int:
    from ..serve.server import load_served_model, run_server

    adapters = [_adapter_arg(a) for a in args.adapter]
    names = [n for n, _ in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"--adapter names must differ, got {names}")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch {args.max_batch} must be at least 1")
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key is empty")
    quiet_transformers()
    set_threads(args.threads)
    folder, base = model_dir(args.model)
    base = args.served_model_name or base
    if base in names:
        raise ValueError(f"the adapter name {base!r} is the base model's name; pick another")
    model, tokenizer = load_served_model(folder, adapters)
    return run_server(
        model=model,
        tokenizer=tokenizer,
        base_name=base,
        model_path=str(folder.resolve()),
        adapter_paths={n: str(Path(p).resolve()) for n, p in adapters},
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        api_key=args.api_key if args.api_key is not None else os.environ.get("PEFTKIT_API_KEY"),
        allow_loading=args.allow_adapter_loading,
        max_body=args.max_body_bytes,
    )
