"""``peftkit train``: fine-tune a model with an adapter; print held-out accuracy (or perplexity)
before and after; write the adapter, ``peftkit_train.json`` and ``metrics.json`` to ``--output``.

Also here: ``--nproc N`` (this same command as N processes), checkpoints with ``--save-every`` and
``--resume``, and the lock that refuses a second writer to the same ``--output``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import train as T
from ..config import AdapterConfig
from ..core import adapters, trainable_parameters
from ..data import Example, load_file, minilm_path, split_dataset
from ..inject import adapt
from ..methods import METHODS
from ..state import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from .common import (
    USER_DATA_TEST_FRACTION,
    VADER,
    CliError,
    metric_name,
    quiet_transformers,
    set_threads,
    status,
    vader_splits,
    warn,
    write_json,
)

METRICS_NAME = "metrics.json"
CHECKPOINTS = "checkpoints"
# What a run computes from: a resumed run must repeat these (--lr may change).
RUN_KEYS = (
    "model", "method", "r", "alpha", "config", "target_modules", "steps", "batch_size",
    "grad_accum", "max_length", "weight_decay", "seed", "data", "eval_data", "task",
    "loraplus_ratio", "quantize",
)  # fmt: skip


def add_parser(sub: Any) -> None:
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
    p.set_defaults(func=run)


# -- what the report prints -----------------------------------------------------------------------
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


# -- the run's data -------------------------------------------------------------------------------
def _training_data(
    args: argparse.Namespace, task: str
) -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[str, ...], str]:
    """``(train, test, label_names, description)`` for ``peftkit train``."""
    if args.data is None:
        if args.eval_data is not None:
            raise CliError("--eval-data needs --data (the default task has its own test split)")
        s = vader_splits()
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


# -- several processes (--nproc, torchrun, accelerate) --------------------------------------------
def _world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun, accelerate, --nproc)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _env_threads() -> int | None:
    v = os.environ.get("PEFTKIT_THREADS")
    return int(v) if v and v.isdigit() and int(v) > 0 else None


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


# -- one writer per --output, checkpoints and --resume --------------------------------------------
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
    from ..checkpoint import sha256_file

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
    from ..checkpoint import latest_checkpoint

    root = Path(args.output) / CHECKPOINTS
    rank, _ = _world()
    found = latest_checkpoint(root, warn=warn if rank == 0 else None)
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
    from ..checkpoint import checkpoints

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


# -- the command ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
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

    quiet_transformers()
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
        warn(
            f"the run was checkpointed with --threads {saved_threads}; with {args.threads} the "
            "resumed run is not bit-identical to an uninterrupted one (reduction order)"
        )
    threads = set_threads(args.threads or saved_threads or _env_threads())
    torch.manual_seed(args.seed)
    if rank == 0:
        status(f"loading {model_path} ...")
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
    metric = metric_name(task)
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
        from ..checkpoint import load_checkpoint
        from ..hooks import attach

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
    fingerprint = _fingerprint(args, model_path)

    def on_step(step: int, step_losses: list[float]) -> None:
        if args.save_every and step % args.save_every == 0:
            from ..checkpoint import save_checkpoint

            trainer = {
                "run": fingerprint, "run_lr": args.lr, "losses": step_losses, "before": before,
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
    write_json(out / T.TRAIN_INFO, info)
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
    write_json(out / METRICS_NAME, metrics)
    print(
        f"time       {seconds:.1f} s in all; peak memory (RSS) "
        f"{metrics['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    print(f"wrote      {out}/ ({WEIGHTS_NAME}, {CONFIG_NAME}, {T.TRAIN_INFO}, {METRICS_NAME})")
    if len(saved) > (resume is not None):
        print(f"checkpoints {ckpt_root}/ (newest {saved[-1].name})")
    return 0
