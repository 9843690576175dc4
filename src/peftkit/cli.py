"""The ``peftkit`` command: fetch-data, train, eval, merge, export, inspect.

    peftkit fetch-data                       # once: the VADER movie-review sentences
    peftkit train                            # LoRA on all-MiniLM-L6-v2, binary sentiment
    peftkit eval --adapter peftkit-out       # accuracy (or perplexity) of base + adapter
    peftkit merge --adapter peftkit-out --output merged
    peftkit export --adapter peftkit-out --output lora
    peftkit inspect peftkit-out

Results go to stdout, progress bars (tqdm) and status to stderr. A bad input (a missing path, an
unknown method, a target that matches nothing, a data file without its columns) ends with one line
``peftkit: error: ...`` on stderr and exit status 2; set ``PEFTKIT_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import train as T
from .config import AdapterConfig
from .core import adapters, trainable_parameters
from .data import (
    VADER_REQUIREMENT,
    DataError,
    Example,
    fetch_vader,
    load_file,
    minilm_path,
    split_dataset,
    vader,
    vader_path,
)
from .inject import adapt, merge_and_unload
from .methods import METHODS
from .state import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    export_lora,
    load_adapter,
    read_adapter_config,
    save_adapter,
)

PROG = "peftkit"
METRICS_NAME = "metrics.json"
VADER = "vader"
USER_DATA_TEST_FRACTION = 0.1
# Sentences for the merge check: any text will do, the check compares two models on it.
PROBE_TEXTS = (
    "A warm, funny and beautifully acted film.",
    "Dull, predictable and far too long.",
    "The plot",
    "It is neither good nor bad, just there, like a screensaver with a soundtrack.",
)
USER_ERRORS = (DataError, OSError, ValueError, TypeError, KeyError)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


# -- small helpers --------------------------------------------------------------------------------
def _status(text: str) -> None:
    # Note: only on a terminal, so that a failing command's stderr in a log is its one error line.
    if sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)


def _warn(text: str) -> None:
    print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)


def _quiet_transformers() -> None:
    # Note: the CLI reads local folders only; these keep transformers off the network and quiet
    # about the new classification head, which is expected. An explicit user setting wins.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
        transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # "Loading weights": instant from local disk


def _set_threads(n: int | None) -> str:
    """Set torch's CPU threads: ``n``, or by default as many as there are idle cores.

    Note: measured on a 2-core machine at load 12, two threads per process made a MiniLM step
    4-5x slower than one (each op waits on a descheduled partner thread), while on an idle
    machine two threads are faster. So the default counts idle cores from the 1-minute load
    average; ``--threads`` overrides it."""
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


def _targets(values: Sequence[str] | None) -> str | tuple[str, ...] | None:
    """``--target-modules query value``, ``query,value``, ``all-linear`` or one regex."""
    if not values:
        return None
    names = [n for v in values for n in v.split(",") if n.strip()]
    if len(names) == 1 and (names[0] == "all-linear" or re.search(r"[\\^$*+?()\[\]|{}]", names[0])):
        return names[0]
    return tuple(n.strip() for n in names)


def _fmt_targets(config: AdapterConfig) -> str:
    tm = config.target_modules
    return tm if isinstance(tm, str) else ", ".join(tm or ())


def _describe(config: AdapterConfig, options: dict[str, Any]) -> str:
    parts = [config.method]
    for name in ("r", "init_r", "target_r", "lora_alpha"):
        if hasattr(config, name):
            parts.append(f"{name}={getattr(config, name)}")
    parts += [f"{k}={v}" for k, v in options.items() if k not in ("r", "init_r", "lora_alpha")]
    return " ".join(parts)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)


def _metric_name(task: str) -> str:
    return "perplexity" if task == T.CAUSAL_LM else "accuracy"


def _read_info(adapter: Path) -> dict[str, Any]:
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


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# -- data for a run -------------------------------------------------------------------------------
def _vader_splits() -> Any:
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


def _training_data(
    args: argparse.Namespace, task: str
) -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[str, ...], str]:
    """``(train, test, label_names, description)`` for ``peftkit train``."""
    if args.data is None:
        if args.eval_data is not None:
            raise CliError("--eval-data needs --data (the default task has its own test split)")
        s = _vader_splits()
        desc = f"VADER movie-review snippets: {len(s.train):,} train, {len(s.test):,} held out"
        return s.train, s.test, s.label_names, desc
    ds = load_file(args.data, task=task)
    if args.eval_data is not None:
        names = ds.label_names if task == T.CLASSIFY else None
        test = load_file(args.eval_data, task=task, label_names=names).examples
        desc = f"{args.data}: {len(ds.examples):,} train; {args.eval_data}: {len(test):,} held out"
        return ds.examples, test, ds.label_names, desc
    s = split_dataset(ds.examples, 0, USER_DATA_TEST_FRACTION, label_names=ds.label_names)
    desc = f"{args.data}: {len(s.train):,} train, {len(s.test):,} held out (10 %, split seed 0)"
    return s.train, s.test, s.label_names, desc


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
        s = _vader_splits()
        return s.test, s.label_names, f"VADER held-out test split ({len(s.test):,} examples)"
    if info.get("eval_data"):
        ds = load_file(info["eval_data"], task=task, label_names=names)
        return ds.examples, ds.label_names, f"{info['eval_data']} ({len(ds.examples):,} examples)"
    ds = load_file(source, task=task, label_names=names)
    s = split_dataset(ds.examples, 0, USER_DATA_TEST_FRACTION, label_names=ds.label_names)
    return s.test, s.label_names, f"{source}, held-out split ({len(s.test):,} examples)"


def _rebuild(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], str, tuple[str, ...]]:
    """Base model + adapter from an adapter folder: ``(model, tokenizer, info, task, labels)``.

    The base model, task and labels come from the command line, else from the folder's
    ``peftkit_train.json``, else (a PEFT folder) from ``base_model_name_or_path``."""
    adapter = Path(args.adapter)
    config = read_adapter_config(adapter)
    info = _read_info(adapter)
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
    _quiet_transformers()
    _set_threads(args.threads)
    _status(f"loading {model_path} + {adapter} ...")
    model, tokenizer = T.load_model(model_path, task, label_names=labels)
    if info.get("quantize") == "nf4":
        T.quantize_base(model, config.get("modules_to_save") or ())
    load_adapter(model, adapter)
    return model, tokenizer, info, task, labels


def _new_output_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CliError(f"{out} exists and is not an empty folder; choose a new --output")
    return out


# -- commands -------------------------------------------------------------------------------------
def cmd_fetch_data(args: argparse.Namespace) -> int:
    if not vader_path(args.cache_dir).is_file():
        _status(f"downloading the {VADER_REQUIREMENT} sdist from PyPI ...")
    print(fetch_vader(args.cache_dir))
    return 0


CHECKPOINTS = "checkpoints"
# What a run computes from: a resumed run must repeat these (--lr may change).
RUN_KEYS = (
    "model", "method", "r", "alpha", "config", "target_modules", "steps", "batch_size",
    "grad_accum", "max_length", "weight_decay", "seed", "data", "eval_data", "task",
    "loraplus_ratio", "quantize",
)  # fmt: skip


def _world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun, accelerate, --nproc)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: run this same command as N processes (rank 0 prints), like ``torchrun
    --standalone --nproc-per-node N -m peftkit train ...``, which works too."""
    import subprocess

    n = args.nproc
    if args.threads is None:
        idle = os.cpu_count() or n
        try:
            idle = max(1, round(idle - os.getloadavg()[0]))
        except OSError:
            pass
        threads = max(1, idle // n)
    else:
        threads = args.threads
    port = _free_port()
    procs = []
    for rank in range(n):
        env = dict(os.environ)
        env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
            PEFTKIT_THREADS=str(threads),
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "peftkit", *args.argv], env=env, preexec_fn=_die_with_parent
            )
        )
    codes: dict[int, int] = {}
    try:
        while len(codes) < n:
            for rank, p in enumerate(procs):
                if rank not in codes and p.poll() is not None:
                    codes[rank] = p.returncode
                    if p.returncode != 0:  # one failed: the others would wait on it forever
                        for q in procs:
                            if q.poll() is None:
                                q.terminate()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    bad = [c for _, c in sorted(codes.items()) if c != 0]
    return bad[0] if bad else 0


def _die_with_parent() -> None:
    """In a ``--nproc`` worker before exec: on Linux, get SIGKILL when the launcher dies (so a
    killed launcher leaves no process writing to --output)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass


_LOCKS: list[Any] = []


def _lock_output(out: Path) -> None:
    """Hold an exclusive lock on ``out`` for this process's life: a second ``peftkit train``
    writing to the same folder (e.g. a --resume while the first run still lives) is refused."""
    try:
        import fcntl
    except ImportError:  # not on this platform
        return
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".peftkit-train.lock", "w")  # noqa: SIM115  (held until exit)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise CliError(
            f"another peftkit train is writing to {out}; wait for it or stop it first"
        ) from None
    _LOCKS.append(f)


def _fingerprint(args: argparse.Namespace, model_path: Path) -> dict[str, Any]:
    """The options a resumed run must repeat, with the contents of the model's config and of the
    data files (a file edited between the kill and the resume is caught, not trained on)."""
    d = {k: getattr(args, k) for k in RUN_KEYS}
    d["model"] = str(model_path.resolve())
    d["config"] = sorted(d["config"])
    from .checkpoint import sha256_file

    def digest(path: Path) -> str | None:
        return sha256_file(path) if path.is_file() else None

    d["model_config_sha256"] = digest(model_path / "config.json")
    for k in ("data", "eval_data"):
        if d[k] is not None:
            d[f"{k}_sha256"] = digest(Path(d[k]))
            d[k] = str(Path(d[k]).resolve())
    out: dict[str, Any] = json.loads(json.dumps(d))  # tuples -> lists, as from the file
    return out


def _resume_point(args: argparse.Namespace, model_path: Path) -> tuple[Path, dict[str, Any]] | None:
    from .checkpoint import latest_checkpoint

    root = Path(args.output) / CHECKPOINTS
    rank, _ = _world()
    warn = _warn if rank == 0 else None
    found = latest_checkpoint(root, warn=warn)
    if not args.resume:
        if found is not None:
            raise CliError(
                f"{root} holds checkpoints of an earlier run; add --resume to continue it, or "
                "choose a new --output"
            )
        existing = Path(args.output) / WEIGHTS_NAME
        if existing.exists() and not args.overwrite:
            raise CliError(
                f"{existing} exists (an earlier run's adapter); choose a new --output, or add "
                "--overwrite to replace it"
            )
        return None
    if found is None:
        raise CliError(
            f"--resume: no checkpoint in {root} (was the run started with --save-every?)"
        )
    saved = found[1].get("run", {})
    now = _fingerprint(args, model_path)
    for k in now:
        if saved.get(k) != now[k]:
            raise CliError(
                f"--resume: {found[0]} was trained with {k}={saved.get(k)!r}, this command has "
                f"{now[k]!r}; repeat the original options"
            )
    return found


def _after_divergence(e: Any, root: Path, rank: int) -> str:
    """Set aside the checkpoints that lead straight into the divergence and name the newest one
    left: after a non-finite loss or gradient at step d, step d-1's parameters produce it again
    whatever the learning rate, so resuming needs step d-2 or older (after an overflowing update
    at step d, step d-1 is fine: a lower --lr changes that update)."""
    from .checkpoint import checkpoints

    limit = e.step - 1 if e.updated else e.step - 2
    found = checkpoints(root)
    if rank == 0:
        for step, folder in found:
            if step > limit:
                folder.rename(folder.with_name(f"diverged-{folder.name}"))
    good = [(s, f) for s, f in found if s <= limit]
    moved = " (later ones were renamed diverged-step-...)" if len(good) < len(found) else ""
    if good:
        return (
            f"resume from {good[0][1]} (step {good[0][0]}) with a lower learning rate: add "
            f"--resume --lr <smaller>{moved}"
        )
    if found:
        return (
            f"no checkpoint from before step {limit + 1} is left{moved}; start again with a "
            "lower --lr and a new --output"
        )
    return "no checkpoint was written (--save-every N keeps them); start again with a lower --lr"


def cmd_train(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    rank, world = _world()
    if args.nproc is not None:
        if args.nproc < 1:
            raise CliError(f"--nproc {args.nproc} must be at least 1")
        if args.nproc > 1 and world == 1:
            return _launch(args)
        if world not in (1, args.nproc):
            raise CliError(f"--nproc {args.nproc} but the launcher started {world} processes")
    task = args.task
    if args.model is None and task == T.CAUSAL_LM:
        raise CliError("--task causal-lm needs --model, a local causal LM folder (e.g. SmolLM2)")
    if args.method not in METHODS:
        raise CliError(
            f"unknown method {args.method!r}; choose one of {', '.join(sorted(METHODS))}"
        )
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.batch_size % (args.grad_accum * world):
        raise CliError(
            f"--batch-size {args.batch_size} does not split into --grad-accum {args.grad_accum} x "
            f"{world} process(es); use a multiple of {args.grad_accum * world}"
        )
    if args.save_every < 0 or args.keep_checkpoints < 1:
        raise CliError(
            f"--save-every {args.save_every} must be >= 0 and --keep-checkpoints "
            f"{args.keep_checkpoints} >= 1"
        )
    if args.max_length < 2:
        raise CliError(f"--max-length {args.max_length} is too short; use e.g. 64")
    if not args.lr > 0:
        raise CliError(f"--lr {args.lr} must be positive, e.g. --lr 2e-3")
    model_path = Path(args.model) if args.model is not None else minilm_path()
    T.check_model_folder(model_path)
    options = dict(T.parse_option(o) for o in args.config)
    resume = _resume_point(args, model_path)
    train, test, label_names, data_desc = _training_data(args, task)
    if task == T.CLASSIFY and len(label_names) < 2:
        raise CliError(f"{args.data}: classification needs at least 2 labels, found {label_names}")

    _quiet_transformers()
    import torch

    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            # Note: checkpoint writes and the ranks' uneven shares of an evaluation make some
            # ranks wait in a collective; the default 30-minute timeout is cut too fine.
            dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=6))
        if rank != 0:  # rank 0 speaks for the run
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            os.environ["TQDM_DISABLE"] = "1"
    saved_threads = resume[1].get("threads") if resume is not None else None
    if args.threads is not None and saved_threads and args.threads != saved_threads:
        _warn(
            f"the run was checkpointed with --threads {saved_threads}; with {args.threads} the "
            "resumed run is not bit-identical to an uninterrupted one (reduction order)"
        )
    threads = _set_threads(args.threads or saved_threads or _env_threads())
    torch.manual_seed(args.seed)
    if rank == 0:
        _status(f"loading {model_path} ...")
    model, tokenizer = T.load_model(model_path, task, label_names=label_names)
    _, total = trainable_parameters(model)
    targets = _targets(args.target_modules) or T.default_targets(model, args.method)
    heads = T.head_modules(model, len(label_names)) if task == T.CLASSIFY else None
    config = T.build_config(
        args.method,
        target_modules=targets,
        modules_to_save=heads,
        r=args.r,
        alpha=args.alpha,
        steps=args.steps,
        options=options,
    )
    if args.quantize == "nf4":
        T.quantize_base(model, heads or ())
    adapt(model, config)
    trainable, _ = trainable_parameters(model)
    n_layers = sum(1 for _ in adapters(model))
    if rank > 0:  # same initial model on every process, its own dropout stream on each
        torch.manual_seed(args.seed + 1_000_003 * rank)

    train_enc = T.encode(tokenizer, train, task, args.max_length)
    test_enc = T.encode(tokenizer, test, task, args.max_length)
    metric = _metric_name(task)
    print(f"model      {model_path} ({type(model).__name__}, {_millions(total)} parameters)")
    print(f"data       {data_desc}")
    extra = f" + {', '.join(heads)} trained in full" if heads else ""
    extra += ", NF4 base" if args.quantize else ""
    extra += f", LoRA+ ratio {args.loraplus_ratio:g}" if args.loraplus_ratio else ""
    print(
        f"adapter    {_describe(config, options)} on {_fmt_targets(config)} "
        f"({n_layers} modules){extra}"
    )
    print(f"trainable  {trainable:,} parameters ({100 * trainable / total:.2f} % of the model)")
    print(f"threads    {threads}" + (f" in each of {world} processes" if world > 1 else ""))
    sys.stdout.flush()

    optimizer = T.make_optimizer(
        model, args.lr, weight_decay=args.weight_decay, loraplus_ratio=args.loraplus_ratio
    )
    start_step, losses, before = 0, [], None
    if resume is not None:
        from .checkpoint import load_checkpoint
        from .hooks import attach

        attach(optimizer, model)  # the hooks' states ride in the optimizer's
        state = load_checkpoint(resume[0], model=model, optimizer=optimizer)
        start_step, losses, before = state["step"], list(state["losses"]), state.get("before")
        old_lr = state["run_lr"]
        for g in optimizer.param_groups:
            g["lr"] *= args.lr / old_lr  # keeps LoRA+'s ratio; a no-op for the same --lr
        print(f"resumed    from {resume[0]} (step {start_step} of {args.steps})")
    if before is None:  # every rank scores its share of the batches
        before = T.evaluate(
            model, test_enc, task=task, batch_size=args.eval_batch_size, distributed=world > 1
        )
    print(f"{metric} before training: {before:.4f}")
    sys.stdout.flush()

    if rank == 0:
        _lock_output(Path(args.output))
    trained: Any = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model)
    ckpt_root = Path(args.output) / CHECKPOINTS
    saved: list[Path] = [resume[0]] if resume is not None else []
    run = _fingerprint(args, model_path)

    def on_step(step: int, step_losses: list[float]) -> None:
        if args.save_every and step % args.save_every == 0:
            from .checkpoint import save_checkpoint

            trainer = {
                "run": run, "run_lr": args.lr, "losses": step_losses, "before": before,
                "threads": torch.get_num_threads(),
            }  # fmt: skip
            saved.append(
                save_checkpoint(
                    ckpt_root, step, model=trained, optimizer=optimizer,
                    trainer_state=trainer, keep=args.keep_checkpoints,
                )
            )  # fmt: skip

    try:
        fit = T.fit(
            trained,
            train_enc,
            task=task,
            steps=args.steps,
            batch_size=args.batch_size,
            optimizer=optimizer,
            seed=args.seed,
            grad_accum=args.grad_accum,
            start_step=start_step,
            losses=losses,
            on_step=on_step,
        )
    except T.TrainingDiverged as e:
        advice = _after_divergence(e, ckpt_root, rank)
        raise CliError(f"{e}. The adapter was not written; {advice}") from None
    after = T.evaluate(
        model, test_enc, task=task, batch_size=args.eval_batch_size, distributed=world > 1
    )
    window = fit.losses
    first = sum(window[:10]) / len(window[:10])
    last = sum(window[-10:]) / len(window[-10:])
    median = f"{fit.median_step:.2f} s/step median" if fit.step_seconds else "no step left"
    accum = f" (accumulated over {args.grad_accum})" if args.grad_accum > 1 else ""
    print(
        f"trained    {args.steps} steps x {args.batch_size}{accum}, lr {args.lr:g}, max length "
        f"{args.max_length}: loss {first:.3f} -> {last:.3f} (mean of first/last 10 steps), "
        f"{fit.seconds:.1f} s ({median})"
    )
    print(f"{metric} after training:  {after:.4f}")

    out = Path(args.output)
    save_adapter(model, out)
    if rank != 0:
        return 0
    info = {
        "model": str(model_path.resolve()),
        "task": task,
        "num_labels": len(label_names) if task == T.CLASSIFY else None,
        "label_names": list(label_names) if task == T.CLASSIFY else None,
        "max_length": args.max_length,
        "data": str(Path(args.data).resolve()) if args.data is not None else VADER,
        "eval_data": str(Path(args.eval_data).resolve()) if args.eval_data is not None else None,
        "method": config.method,
        "seed": args.seed,
        "quantize": args.quantize,
    }
    _write_json(out / T.TRAIN_INFO, info)
    seconds = time.perf_counter() - started
    metrics = {
        f"{metric}_before": before,
        f"{metric}_after": after,
        "held_out_examples": len(test_enc),
        "method": config.method,
        "task": task,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "processes": world,
        "resumed_from_step": start_step if resume is not None else None,
        "lr": args.lr,
        "max_length": args.max_length,
        "seed": args.seed,
        "quantize": args.quantize,
        "loraplus_ratio": args.loraplus_ratio,
        "seconds": round(seconds, 2),
        "train_seconds": round(fit.seconds, 2),
        "median_step_seconds": round(fit.median_step, 4) if fit.step_seconds else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "peak_rss_bytes": T.peak_rss_bytes(),
        "loss_first10": first,
        "loss_last10": last,
    }
    _write_json(out / METRICS_NAME, metrics)
    print(
        f"time       {seconds:.1f} s in all; peak memory (RSS) "
        f"{metrics['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    print(f"wrote      {out}/ ({WEIGHTS_NAME}, {CONFIG_NAME}, {T.TRAIN_INFO}, {METRICS_NAME})")
    if len(saved) > (resume is not None):
        print(f"checkpoints {ckpt_root}/ (newest {saved[-1].name})")
    return 0


def _env_threads() -> int | None:
    v = os.environ.get("PEFTKIT_THREADS")
    return int(v) if v and v.isdigit() and int(v) > 0 else None


RANK_CURVE = "rank_curve.json"


def cmd_eval(args: argparse.Namespace) -> int:
    model, tokenizer, info, task, labels = _rebuild(args)
    examples, _, desc = _eval_data(args, info, task, labels if task == T.CLASSIFY else None)
    max_length = args.max_length or int(info.get("max_length") or 64)
    enc = T.encode(tokenizer, examples, task, max_length)
    metric = _metric_name(task)
    if args.ranks:
        return _eval_ranks(args, model, enc, task, desc)
    value = T.evaluate(model, enc, task=task, batch_size=args.eval_batch_size)
    print(f"data       {desc}")
    print(f"{metric}   {value:.4f}")
    return 0


def _eval_ranks(args: argparse.Namespace, model: Any, enc: T.Encoded, task: str, desc: str) -> int:
    """DyLoRA: the metric at every rank 1..r of one adapter (``set_rank``), printed and written
    to ``ADAPTER/rank_curve.json`` for ``peftkit inspect --plot``."""
    from .methods import dylora

    layers = [a for _, a in adapters(model) if isinstance(a, dylora.DyLoraLayer)]
    if not layers:
        raise CliError(f"--ranks needs a DyLoRA adapter; {args.adapter} is not one")
    metric = _metric_name(task)
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
    _write_json(Path(args.adapter) / RANK_CURVE, {"metric": metric, "data": desc, "ranks": curve})
    print(f"wrote      {Path(args.adapter) / RANK_CURVE}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    out = _new_output_dir(args.output)
    model, tokenizer, _, _, _ = _rebuild(args)
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


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        return _export_gguf(args)
    model, _, _, _, _ = _rebuild(args)
    out = export_lora(model, args.output, rank=args.rank)
    info = Path(args.adapter) / T.TRAIN_INFO
    if info.is_file():
        shutil.copyfile(info, out / T.TRAIN_INFO)
    summary = summarize_adapter(out)
    print(f"wrote      {out}/ (plain PEFT LoRA, ranks {summary['rank_summary']})")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from .gguf_export import export_gguf

    if Path(args.output).suffix != ".gguf":  # before the model loads
        raise CliError(f"{args.output}: a GGUF adapter file name must end in .gguf")
    # llama.cpp runs generative models: a folder that names no task is a causal LM's adapter.
    args.task = args.task or _read_info(Path(args.adapter)).get("task") or T.CAUSAL_LM
    model, _, _, _, _ = _rebuild(args)
    out = export_gguf(model, args.output, rank=args.rank)
    print(f"wrote      {out} (llama.cpp LoRA adapter; load it beside the base model's GGUF)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    summary = summarize_adapter(args.adapter)
    if args.plot is not None:
        plot_ranks(summary, args.plot)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"adapter    {summary['path']}")
    print(f"method     {summary['method']} (peft_type {summary['peft_type']})")
    if summary["base_model"]:
        print(f"base model {summary['base_model']}")
    print(f"targets    {_short_targets(summary['targets'])} -> {len(summary['modules'])} modules")
    print(f"ranks      {summary['rank_summary']}")
    for name, n in summary["modules_to_save"].items():
        print(f"in full    {name} ({n:,} parameters)")
    print(
        f"parameters {summary['trainable_parameters']:,} trainable"
        + (f" (+ {summary['frozen_parameters']:,} frozen)" if summary["frozen_parameters"] else "")
    )
    files = ", ".join(f"{k} {v:,}" for k, v in summary["files"].items())
    print(f"on disk    {summary['bytes']:,} bytes ({files})")
    width = max((len(m) for m in summary["modules"]), default=6)
    print()
    print(f"{'module':<{width}}  {'rank':>5}  {'params':>10}")
    for name, m in summary["modules"].items():
        rank = "?" if m["rank"] is None else str(m["rank"])
        print(f"{name:<{width}}  {rank:>5}  {m['parameters']:>10,}")
    if args.plot is not None:
        print(f"\nwrote      {args.plot}")
    return 0


def _short_targets(targets: str) -> str:
    """Full module paths (as export_lora and PEFT's all-linear write them) shown by their tails."""
    names = [t.strip() for t in targets.split(",")]
    if len(names) <= 4 or not all("." in n for n in names):
        return targets
    tails = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"{', '.join(tails)} (listed as {len(names)} full paths)"


# -- inspect without a model ----------------------------------------------------------------------
_FROZEN_PARTS = (".base_layer.",)
_FROZEN_SHARED = ("vera_A", "vera_B")
_ADAPTER_PARTS = ("lora_", "vera_", "base_layer", "modules_to_save")


def _owner(path: str, targets: Any, saved: Sequence[str]) -> tuple[str, str]:
    """``(module path, kind)`` for a tensor key (``base_model.model.`` stripped); kind is
    ``"adapter"`` or ``"saved"``. The deepest prefix that the config's targets select wins."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix, tail = ".".join(parts[:i]), parts[i - 1]
        # PEFT matches modules_to_save on a name's tail, which may span several parts.
        if any(prefix == s or prefix.endswith(f".{s}") for s in saved):
            return prefix, "saved"
        if isinstance(targets, str):
            if targets != "all-linear" and re.fullmatch(targets, prefix):
                return prefix, "adapter"
        elif tail in targets:
            return prefix, "adapter"
    for i, part in enumerate(parts):
        if i and part.startswith(_ADAPTER_PARTS):
            return ".".join(parts[:i]), "adapter"
    return ".".join(parts[:-1]), "adapter"


def _rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The rank of one module from its tensor shapes: A is (r, in) in every LoRA-shaped layout;
    VeRA's λ_d has one entry per rank; otherwise the smallest side of a 2-D factor."""
    for suffix in ("lora_A.weight", "lora_embedding_A", "lora_A"):
        if suffix in shapes and shapes[suffix]:
            return int(shapes[suffix][0])
    for suffix in ("vera_lambda_d", "lambda_d"):
        if suffix in shapes:
            n = 1
            for s in shapes[suffix]:
                n *= s
            return n
    sides = [min(s) for s in shapes.values() if len(s) == 2]
    return min(sides) if sides else None


def summarize_adapter(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Method, targets, per-module ranks, parameters and bytes of an adapter folder, read from
    ``adapter_config.json`` and the safetensors header alone (no model, no tensor data)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(directory)
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CliError(f"{weights}: missing; {folder} has a config but no safetensors weights")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CliError(f"{weights}: unreadable safetensors file ({e})") from None
    targets = config.get("target_modules") or ()
    if isinstance(targets, list):
        targets = tuple(targets)
    saved = tuple(config.get("modules_to_save") or ())
    modules: dict[str, dict[str, Any]] = {}
    in_full: dict[str, int] = {}
    grouped: dict[str, dict[str, tuple[int, ...]]] = {}
    trainable = frozen = 0
    for key, shape in sorted(shapes.items()):
        numel = 1
        for s in shape:
            numel *= s
        if not key.startswith(PREFIX):  # shared state, e.g. VeRA's base_model.vera_A
            if key.rsplit(".", 1)[-1] in _FROZEN_SHARED:
                frozen += numel
            else:
                trainable += numel
            continue
        path = key[len(PREFIX) :]
        if any(p in f".{path}." for p in _FROZEN_PARTS):
            frozen += numel
            continue
        trainable += numel
        owner, kind = _owner(path, targets, saved)
        if kind == "saved":
            in_full[owner] = in_full.get(owner, 0) + numel
            continue
        grouped.setdefault(owner, {})[path[len(owner) + 1 :]] = shape
        modules.setdefault(owner, {"rank": None, "parameters": 0})["parameters"] += numel
    for owner, tensors in grouped.items():
        modules[owner]["rank"] = _rank(tensors)
    ranks = sorted({m["rank"] for m in modules.values() if m["rank"] is not None})
    if len(ranks) == 1:
        rank_summary = f"{ranks[0]} on every module"
    elif ranks:
        rank_summary = f"{ranks[0]}..{ranks[-1]} (per module below)"
    else:
        rank_summary = "unknown"
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    method = config.get("peftkit_method") or (
        "dora" if config.get("use_dora") else str(config.get("peft_type", "?")).lower()
    )
    return {
        "path": str(folder),
        "method": method,
        "peft_type": config.get("peft_type"),
        "base_model": config.get("base_model_name_or_path"),
        "targets": targets if isinstance(targets, str) else ", ".join(targets),
        "rank_summary": rank_summary,
        "modules": modules,
        "modules_to_save": in_full,
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "bytes": sum(files.values()),
        "files": files,
    }


def plot_ranks(summary: dict[str, Any], path: str) -> None:
    """A heatmap of rank per module (rows: layer indices, columns: module names within a layer);
    for a DyLoRA folder with ``peftkit eval --ranks`` results, the metric-by-rank curve instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install matplotlib") from None
    cells: dict[tuple[str, str], int] = {}
    for name, m in summary["modules"].items():
        hit = re.search(r"\.(\d+)\.", f".{name}.")
        layer = hit.group(1) if hit else "-"
        column = name[hit.end() - 1 :] if hit else name
        cells[(layer, column)] = m["rank"] if m["rank"] is not None else 0
    curve_file = Path(summary["path"]) / RANK_CURVE
    if curve_file.is_file():  # DyLoRA with `peftkit eval --ranks` results: the curve says more
        curve = json.loads(curve_file.read_text(encoding="utf-8"))
        xs = sorted(int(k) for k in curve["ranks"])
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(xs, [curve["ranks"][str(x)] for x in xs], marker="o")
        ax.set_xlabel("rank used at inference (set_rank)")
        ax.set_ylabel(curve["metric"])
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.set_title(
            f"{summary['method']}: {curve['metric']} by rank ({Path(summary['path']).name})"
        )
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return
    if not cells:
        raise CliError(f"{summary['path']}: no adapted modules to plot")
    rows = sorted(
        {r for r, _ in cells}, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0)
    )
    cols = sorted({c for _, c in cells})
    grid = [[cells.get((r, c), 0) for c in cols] for r in rows]  # (layers, module names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.35 * len(rows)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylabel("layer")
    ax.set_title(f"{summary['method']} ranks: {Path(summary['path']).name}")
    if len(rows) * len(cols) <= 400:
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                ax.text(j, i, str(value), ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- the parser -----------------------------------------------------------------------------------
def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Parameter-efficient fine-tuning from the command line.",
        epilog="Errors print one line; PEFTKIT_DEBUG=1 shows the traceback. "
        "TQDM_DISABLE=1 hides progress bars.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fetch-data", help="download and cache the VADER movie-review data (once)")
    p.add_argument("--cache-dir", help="default: $PEFTKIT_CACHE or ~/.cache/peftkit")
    p.set_defaults(func=cmd_fetch_data)

    methods = ", ".join(sorted(METHODS))
    p = sub.add_parser(
        "train",
        help="fine-tune a model with an adapter (default: LoRA on all-MiniLM-L6-v2, VADER)",
        description="Fine-tune with an adapter; print held-out accuracy (or perplexity) before "
        "and after; write the adapter and metrics.json to --output.",
    )
    p.add_argument("--model", help="a local Hugging Face folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--method", default="lora", help=f"one of: {methods} (default: lora)")
    p.add_argument("--r", type=int, help="rank (init_r for AdaLoRA); default: the method's")
    p.add_argument(
        "--alpha",
        type=float,
        help="lora_alpha where the method has it (scale alpha/r); default: the method config's, "
        "a constant whatever --r is (8 for LoRA, as PEFT's LoraConfig; 16 for LongLoRA)",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other field of the method's config, e.g. --config use_rslora=true (repeatable)",
    )
    p.add_argument(
        "--target-modules",
        nargs="+",
        metavar="NAME",
        help="module names (query value), a regex, or all-linear (default: the method's own, "
        "e.g. LongLoRA's q/k/v/o, else the attention query/value projections)",
    )
    p.add_argument("--lr", type=float, default=2e-3, help="constant learning rate (2e-3)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (100)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step (32)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (64)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0)")
    p.add_argument("--seed", type=int, default=0, help="head/adapter init and batch order (0)")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: one per idle core, from the load average)",
    )
    p.add_argument(
        "--data",
        help="JSONL/CSV/TSV with a text column (and a label column to classify); 10 %% is held "
        "out unless --eval-data is given (default: VADER)",
    )
    p.add_argument("--eval-data", help="a held-out file in the same format as --data")
    p.add_argument("--task", choices=T.TASKS, default=T.CLASSIFY, help="(default: classify)")
    p.add_argument("--output", default="peftkit-out", help="adapter folder (./peftkit-out)")
    p.add_argument("--eval-batch-size", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument(
        "--loraplus-ratio",
        type=float,
        help="LoRA+ (peftkit.param_groups): B's learning rate is RATIO x A's, e.g. 16",
    )
    p.add_argument(
        "--quantize",
        choices=("nf4",),
        help="QLoRA: hold the frozen base's linear layers in NF4 (the head stays dense)",
    )
    p.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        metavar="K",
        help="backpropagate each step's --batch-size rows in K micro-batches (less memory, same "
        "result: the loss is normalised over the whole batch's tokens) (1)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="data-parallel training on N CPU processes (DDP, gloo); --batch-size is the total",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=0,
        metavar="N",
        help="write a checkpoint to OUTPUT/checkpoints every N steps (0: never)",
    )
    p.add_argument(
        "--keep-checkpoints", type=int, default=2, metavar="K", help="keep the newest K (2)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its newest intact checkpoint (same options)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an adapter already in --output (refused otherwise)",
    )
    p.set_defaults(func=cmd_train)

    def adapter_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--adapter", required=True, help="an adapter folder (peftkit's or PEFT's)")
        p.add_argument("--model", help="the base model folder (default: the one it was trained on)")
        p.add_argument("--threads", type=int, help="CPU threads (default: one per idle core)")

    p = sub.add_parser("eval", help="accuracy or perplexity of a base model plus an adapter")
    adapter_args(p)
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
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="write a merged model folder that transformers loads")
    adapter_args(p)
    p.add_argument("--output", required=True, help="a new folder for the merged model")
    p.add_argument("--task", choices=T.TASKS, help="(default: the training run's)")
    p.add_argument("--atol", type=float, default=1e-4, help="merged vs adapted logits (1e-4)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write the adapter as a plain PEFT LoRA (export_lora)")
    adapter_args(p)
    p.add_argument("--output", required=True, help="folder for the LoRA (gguf: a .gguf file)")
    p.add_argument(
        "--format",
        choices=("peft", "gguf"),
        default="peft",
        help="peft: a PEFT LoRA folder; gguf: a llama.cpp LoRA adapter file (export_gguf)",
    )
    p.add_argument("--rank", type=int, help="truncate to this rank where the method allows")
    p.add_argument("--task", choices=T.TASKS, help="(default: the training run's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="method, targets, ranks, parameters, bytes of an adapter")
    p.add_argument("adapter", help="an adapter folder (peftkit's or PEFT's)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw a heatmap of rank per module")
    p.set_defaults(func=cmd_inspect)

    from .serve.cli import add_parsers  # serve, generate, fetch-model

    add_parsers(sub)
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


if __name__ == "__main__":
    sys.exit(main())
