"""What several ``peftkit`` commands share: the error type and parser, status lines, torch's
threads, quiet transformers, the run's recorded info, data for a run and the adapter rebuild.

Commands import these names; the rest of peftkit is reached through its public API only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from .. import train as T
from ..data import VADER_REQUIREMENT, fetch_vader, load_file, vader, vader_path
from ..models import SMOLLM2_NAME, fetch_smollm2, is_converted, smollm2_path
from ..state import load_adapter, read_adapter_config

PROG = "peftkit"
VADER = "vader"
USER_DATA_TEST_FRACTION = 0.1
# DyLoRA's metric by rank: written by `peftkit eval --ranks`, drawn by `peftkit inspect --plot`.
RANK_CURVE = "rank_curve.json"
SERVED_MODEL_HELP = f"a local causal-LM folder (default: {SMOLLM2_NAME}, converted once)"


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


# -- small helpers --------------------------------------------------------------------------------
def status(text: str) -> None:
    # Note: only on a terminal, so that a failing command's stderr in a log is its one error line.
    if sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)


def warn(text: str) -> None:
    print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)


def quiet_transformers() -> None:
    # Note: the CLI reads local folders only; these keep transformers off the network and quiet
    # about the new classification head, which is expected. An explicit user setting wins.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
        transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # "Loading weights": instant from local disk


def set_threads(n: int | None) -> str:
    """Set torch's CPU threads: ``n``, or by default as many as there are idle cores.

    Note: measured on a 2-core machine at load 12, two threads per process made a MiniLM step
    4-5x slower than one (each op waits on a descheduled partner thread), and on a loaded 2-core
    machine two threads made SmolLM2's prefill 4x slower than one, while on an idle machine more
    threads are faster. So the default counts idle cores from the 1-minute load average;
    ``--threads`` overrides it. Returns what was chosen, for ``peftkit train``'s report."""
    import torch

    if n is not None:
        if n < 1:
            raise CliError(f"--threads {n} must be at least 1")
        torch.set_num_threads(n)
        return f"{n} (--threads)"
    cores = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return f"{cores}"
    chosen = max(1, min(cores, round((os.cpu_count() or cores) - load)))
    torch.set_num_threads(chosen)
    return f"{chosen} (load {load:.1f} on {os.cpu_count()} cores; --threads overrides)"


def metric_name(task: str) -> str:
    return "perplexity" if task == T.CAUSAL_LM else "accuracy"


def read_info(adapter: Path) -> dict[str, Any]:
    """The training run's ``peftkit_train.json`` in an adapter folder, or ``{}`` without one."""
    path = adapter / T.TRAIN_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CliError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise CliError(f"{path}: expected a JSON object")
    return info


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def new_output_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CliError(f"{out} exists and is not an empty folder; choose a new --output")
    return out


# -- data for a run -------------------------------------------------------------------------------
def vader_splits() -> Any:
    """The default task's splits, fetching the VADER data first when it is not cached (the same
    checksummed, atomic download as ``peftkit fetch-data``)."""
    if not vader_path().is_file():
        # Note: on stdout with the run's report, so that a failed fetch's stderr is its one line.
        print(
            f"data       not cached yet: fetching {VADER_REQUIREMENT} from PyPI once "
            f"(into {vader_path().parent}) ...",
            flush=True,
        )
        fetch_vader()
    return vader(0)


# -- an adapter folder and its base model (eval, merge, export) -----------------------------------
def add_adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="an adapter folder (peftkit's or PEFT's)")
    p.add_argument("--model", help="the base model folder (default: the one it was trained on)")
    p.add_argument("--threads", type=int, help="CPU threads (default: one per idle core)")


def rebuild(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], str, tuple[str, ...]]:
    """Base model + adapter from an adapter folder: ``(model, tokenizer, info, task, labels)``.

    The base model, task and labels come from the command line, else from the folder's
    ``peftkit_train.json``, else (a PEFT folder) from ``base_model_name_or_path``."""
    adapter = Path(args.adapter)
    config = read_adapter_config(adapter)
    info = read_info(adapter)
    task = getattr(args, "task", None) or info.get("task") or T.CLASSIFY
    model_path = args.model or info.get("model") or config.get("base_model_name_or_path")
    if not model_path:
        raise CliError(
            f"{adapter} does not say which base model it adapts; pass --model with its folder"
        )
    labels: tuple[str, ...] = ()
    if task == T.CLASSIFY:
        labels = tuple(info.get("label_names") or ())
        if not labels and getattr(args, "data", None) is not None:
            labels = load_file(args.data, task=task).label_names
        if not labels:
            labels = vader(0).label_names if vader_path().is_file() else ("0", "1")
    quiet_transformers()
    set_threads(args.threads)
    status(f"loading {model_path} + {adapter} ...")
    model, tokenizer = T.load_model(model_path, task, label_names=labels)
    if info.get("quantize") == "nf4":
        T.quantize_base(model, config.get("modules_to_save") or ())
    load_adapter(model, adapter)
    return model, tokenizer, info, task, labels


# -- a served causal LM (serve, generate) ---------------------------------------------------------
def model_dir(arg: str | None) -> tuple[Path, str]:
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
