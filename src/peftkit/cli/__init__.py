"""The ``peftkit`` command: fetch-data, train, eval, merge, export, inspect, fetch-model, serve,
generate.

    peftkit fetch-data                       # once: the VADER movie-review sentences
    peftkit train                            # LoRA on all-MiniLM-L6-v2, binary sentiment
    peftkit eval --adapter peftkit-out       # accuracy (or perplexity) of base + adapter
    peftkit merge --adapter peftkit-out --output merged
    peftkit export --adapter peftkit-out --output lora
    peftkit inspect peftkit-out
    peftkit fetch-model                      # once: SmolLM2-135M-Instruct
    peftkit serve --adapter math=out/math --adapter code=out/code
    peftkit generate --adapter out/math --prompt "What is 7 * 6?"

Results go to stdout, progress bars (tqdm) and status to stderr. A bad input (a missing path, an
unknown method, a target that matches nothing, a data file without its columns) ends with one line
``peftkit: error: ...`` on stderr and exit status 2; set ``PEFTKIT_DEBUG=1`` for the traceback.

Layout: one module per command (``fetch_data``, ``train``, ``eval``, ``merge``, ``export``,
``inspect``, ``fetch_model``, ``serve``, ``generate``), each with ``add_parser(subparsers)`` and
``run(args)``; ``common`` holds what several of them share. They use the rest of peftkit through
its public names only (``tests/test_architecture.py`` checks), and import heavy modules
(transformers, the server) inside ``run``, so that ``peftkit --help`` stays quick.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..data import DataError
from . import eval, export, fetch_data, fetch_model, generate, inspect, merge, serve, train
from .common import PROG, CliError, Parser

__all__ = ["build_parser", "main"]

# In the order `peftkit --help` lists them.
COMMANDS = (fetch_data, train, eval, merge, export, inspect, fetch_model, serve, generate)
USER_ERRORS = (DataError, OSError, ValueError, TypeError, KeyError)


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Parameter-efficient fine-tuning from the command line.",
        epilog="Errors print one line; PEFTKIT_DEBUG=1 shows the traceback. "
        "TQDM_DISABLE=1 hides progress bars.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``peftkit`` command; returns the exit status (0, 2 for bad input, 130 on ^C)."""
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return _leave_process_group(int(args.func(args)))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `peftkit inspect DIR | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except (CliError, *USER_ERRORS) as e:
        if os.environ.get("PEFTKIT_DEBUG"):
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, KeyError):
            text = f"missing key {text}"
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return _leave_process_group(2)


def _leave_process_group(code: int) -> int:
    """A rank of a multi-process run (``--nproc``, torchrun, accelerate) destroys its process
    group and leaves at once: gloo's threads can abort the interpreter's own teardown
    ("terminate called without an active exception") after the work is done and written."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return code
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
