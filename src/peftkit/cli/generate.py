"""``peftkit generate``: one answer from a causal LM (and an adapter), no server.

    peftkit generate --adapter out/math --prompt "What is 7 * 6?"

It decodes with ``peftkit.serve``'s engine, so its text is what ``peftkit serve`` answers for the
same prompt and sampling."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import SERVED_MODEL_HELP, model_dir, quiet_transformers, set_threads


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="one answer from a model (and adapter), no server")
    p.add_argument("--model", help=SERVED_MODEL_HELP)
    p.add_argument("--adapter", help="an adapter folder")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text")
    p.add_argument("--max-tokens", type=int, default=64, help="(64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (0)")
    p.add_argument("--seed", type=int, help="for sampling")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: one per idle core)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..serve.engine import Engine, Event, Sampling
    from ..serve.server import context_length, load_served_model

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens {args.max_tokens} must be at least 1")
    if not 0 <= args.temperature <= 2:
        raise ValueError(f"--temperature {args.temperature} must be between 0 and 2")
    quiet_transformers()
    set_threads(args.threads)
    folder, _ = model_dir(args.model)
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
