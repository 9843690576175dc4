"""Training checkpoints that resume bit for bit, written so that a crash never loses the last one.

A checkpoint is a folder ``<root>/step-<N>/`` holding

- ``model.safetensors``: the training state of the model — every trainable tensor, every tensor of
  the adapter layers except their frozen base (and the base too for a method that updates it, such
  as Delta-LoRA), and the shared module's. Raw, as trained: not the exported adapter file, which
  AdaLoRA prunes and Delta-LoRA folds, so that resuming continues the very same run;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's state dict (tensors apart, the
  rest as JSON; the training hooks' states ride inside it, see :func:`peftkit.attach`);
- ``rng.safetensors``: the torch generator states of every process;
- ``trainer_state.json``: the step, the losses so far and whatever the caller adds;
- ``manifest.json``, written last: the SHA-256 and size of each file above.

Writing goes to a hidden sibling folder that is renamed into place only when complete (then the
oldest checkpoints beyond ``keep`` are removed, and any of a later step: those belong to a run
abandoned at an earlier checkpoint, damaged ones included), so a kill at any moment leaves every
earlier checkpoint intact. :func:`latest_checkpoint` checks the manifest and falls back to the
previous checkpoint when the newest is truncated or corrupted. Only JSON and safetensors are
read: loading a checkpoint never executes code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .core import adapted_layers, get_state, unwrap
from .hooks import STATE_KEY, attach, flatten_state, is_attached, unflatten_state
from .inject import SHARED_ATTR
from .methods import METHODS

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
RNG_FILE = "rng.safetensors"
TRAINER_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_HIDDEN_DIR = re.compile(r"^\.step-\d+\.(partial|old)$")
RESERVED = ("format", "step", "world_size")  # trainer_state keys written by save_checkpoint
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, damaged, or from a different run)."""


# -- what is saved --------------------------------------------------------------------------------
def training_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The tensors that change in training, by their ``state_dict`` key (live, not copies).

    Trainable parameters, plus everything held by the adapter layers and the shared module: the
    frozen base of an adapter layer is left out unless the method updates it (``Method.
    mutates_base``, Delta-LoRA), since rebuilding the model from the same folder restores it.
    Running statistics (BatchNorm's ``running_mean``/``running_var``/``num_batches_tracked``)
    change in training mode even in a frozen module, so they are kept too."""
    root = unwrap(model)
    state = get_state(root, required=False)
    full = root.state_dict(keep_vars=True)
    keep = {name for name, p in root.named_parameters() if p.requires_grad}
    for name, m in root.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            for b, _ in m.named_buffers(recurse=False):
                key = f"{name}.{b}" if name else b
                if key in full:
                    keep.add(key)
    if state is not None:
        mutates = any(
            getattr(METHODS[a.config.method], "mutates_base", False)
            for a in state.adapters.values()
        )
        prefixes = [f"{name}." for name, _ in adapted_layers(root)]
        for key in full:
            for p in prefixes:
                if key.startswith(p) and (mutates or not key.startswith(f"{p}base.")):
                    keep.add(key)
                    break
        if getattr(root, SHARED_ATTR, None) is not None:
            keep.update(k for k in full if k.startswith(f"{SHARED_ATTR}."))
    return {k: full[k] for k in sorted(keep)}


def _cpu(t: Tensor) -> Tensor:
    full = getattr(t, "full_tensor", None)  # an FSDP2 shard: gather (every rank calls this)
    t = full() if callable(full) else t
    return t.detach().to("cpu").clone().contiguous()


def _like(t: Tensor, live: Tensor) -> Tensor:
    """``t``, a full tensor read from a file, laid out as ``live``: sharded the same way when
    ``live`` is an FSDP2 DTensor (a collective: every rank calls this in the same order)."""
    mesh = getattr(live, "device_mesh", None)
    if mesh is None:
        return t
    from torch.distributed.tensor import distribute_tensor

    placements = live.placements  # type: ignore[attr-defined]  # live is a DTensor
    return distribute_tensor(t.to(live.device), mesh, placements)


def _rng_state() -> dict[str, Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, else ``(0, 1)``."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[Any, dict[str, Tensor]]:
    sd = optimizer.state_dict()
    sd = dict(sd)
    sd["state"] = {str(k): v for k, v in sd["state"].items()}  # JSON keys are strings
    tensors: dict[str, Tensor] = {}
    skeleton = flatten_state(sd, "", tensors)
    return skeleton, {k: _cpu(v) for k, v in tensors.items()}


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint folder under ``root``, newest first."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = []
    for p in base.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``root/step-<step>/`` atomically and keep only the newest ``keep`` checkpoints.

    Every process calls this (the generator states are gathered, FSDP2 shards too); rank 0 alone
    writes. Checkpoints of a later step than ``step`` are removed: they belong to the run that
    this one resumed before (a damaged one, or one abandoned on purpose), and a later resume must
    never pick them over this one. Returns the folder."""
    if keep < 1:
        raise ValueError(f"keep={keep} must be at least 1")
    clash = sorted(k for k in RESERVED if k in trainer_state)
    if clash:
        raise ValueError(f"trainer_state must not set {clash}: save_checkpoint writes them")
    state = get_state(model, required=False)
    if state is not None and state.hooks and not is_attached(optimizer, model):
        # Note: the hooks' states ride in the optimizer's state dict only once attached; without
        # it they would be missing from the checkpoint (and the hooks never ran anyway).
        raise ValueError(
            "the model's training hooks are not attached to this optimizer, so their state "
            "cannot be saved; call peftkit.attach(optimizer, model) before training"
        )
    rank, world = dist_rank_world()
    model_t = {k: _cpu(v) for k, v in training_tensors(model).items()}
    opt_json, opt_t = _optimizer_files(optimizer)
    # Note: serialised on every process, so a value JSON cannot hold fails on all of them alike
    # instead of on rank 0 alone while the others wait in the collective below.
    texts = {
        OPTIMIZER_JSON: json.dumps(opt_json),
        TRAINER_FILE: json.dumps(
            {**trainer_state, "format": FORMAT, "step": step, "world_size": world}, indent=1
        ),
    }
    rng = _rng_state()
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    final = Path(root) / f"step-{step:08d}"
    error: Exception | None = None
    if rank == 0:
        rng_t = {f"rank{r}.{k}": v for r, s in enumerate(gathered) for k, v in s.items()}
        tensors = {MODEL_FILE: model_t, OPTIMIZER_TENSORS: opt_t, RNG_FILE: rng_t}
        try:
            _write(final, step, keep, tensors, texts)
        except Exception as e:  # reported to every process below, then raised
            error = e
    if world > 1:
        # Note: not a barrier: a failure on rank 0 (disk full) must stop every process, not
        # leave the others waiting for it in the next collective.
        status: list[Any] = [None] * world
        failed = None if error is None else f"{type(error).__name__}: {error}"
        torch.distributed.all_gather_object(status, failed)
        if error is None and status[0] is not None:
            raise CheckpointError(f"rank 0 could not write {final}: {status[0]}")
    if error is not None:
        raise error
    return final


def _write(
    final: Path, step: int, keep: int, tensors: dict[str, dict[str, Tensor]], texts: dict[str, str]
) -> None:
    """Rank 0's part of :func:`save_checkpoint`: write, fsync, rename into place, rotate."""
    base = final.parent
    base.mkdir(parents=True, exist_ok=True)
    partial = base / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    manifest: dict[str, Any] = {"format": FORMAT, "step": step, "files": {}}
    for name in (*tensors, *texts):
        path = partial / name
        if name in tensors:
            save_file(tensors[name], str(path))
        else:
            path.write_text(texts[name], encoding="utf-8")
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        manifest["files"][name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    with open(partial / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(partial)
    if final.exists():  # a damaged checkpoint of this step from an earlier, killed run
        trash = base / f".{final.name}.old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(partial, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(partial, final)
    _fsync_dir(base)
    found = checkpoints(base)
    later = [p for s, p in found if s > step]
    earlier = [p for s, p in found if s <= step]  # newest first: ``final`` leads
    for old in later + earlier[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for p in base.iterdir():  # what saves killed halfway left (never a checkpoint)
        if _HIDDEN_DIR.match(p.name):
            shutil.rmtree(p, ignore_errors=True)


# -- reading --------------------------------------------------------------------------------------
def verify_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file against the manifest; returns the trainer state. Raises
    :class:`CheckpointError` naming the first problem."""
    path = Path(folder)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: no readable {MANIFEST} ({type(e).__name__}: {e})") from e
    for name in (MODEL_FILE, OPTIMIZER_TENSORS, OPTIMIZER_JSON, RNG_FILE, TRAINER_FILE):
        entry = files.get(name) if isinstance(files, dict) else None
        f = path / name
        if not isinstance(entry, dict) or not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != entry.get("bytes"):
            raise CheckpointError(
                f"{f}: {f.stat().st_size} bytes, the manifest says {entry.get('bytes')} (truncated)"
            )
        if sha256_file(f) != entry.get("sha256"):
            raise CheckpointError(f"{f}: checksum mismatch (the file is corrupted)")
    try:
        state = json.loads((path / TRAINER_FILE).read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path / TRAINER_FILE}: not JSON ({e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path / TRAINER_FILE}: not a format-{FORMAT} trainer state")
    m = _STEP_DIR.match(path.name)
    if m and (int(m.group(1)) != state.get("step") or manifest.get("step") != state.get("step")):
        raise CheckpointError(
            f"{path}: the folder, {MANIFEST} and {TRAINER_FILE} name different steps "
            f"({int(m.group(1))}, {manifest.get('step')!r}, {state.get('step')!r})"
        )
    return state


def latest_checkpoint(
    root: str | os.PathLike[str], warn: Callable[[str], None] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint under ``root`` and its trainer state; damaged ones are
    reported through ``warn`` and skipped. ``None`` when there is no checkpoint at all; a
    :class:`CheckpointError` when there are some but none is intact."""
    found = checkpoints(root)
    problems = []
    for _, folder in found:
        try:
            return folder, verify_checkpoint(folder)
        except CheckpointError as e:
            problems.append(str(e))
            if warn is not None:
                warn(f"skipping damaged checkpoint {folder.name}: {e}")
    if found:
        raise CheckpointError(
            f"no intact checkpoint in {root}: {'; '.join(problems)}; nothing to resume from: "
            f"remove {root} to start the run over"
        )
    return None


def _load(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


@torch.no_grad()
def load_checkpoint(
    folder: str | os.PathLike[str], *, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore the model's training state, the optimizer (with the training hooks' states: the
    hooks are attached to ``optimizer`` here, as :func:`peftkit.attach` would) and this process's
    generator states from ``folder``; returns the trainer state. Every tensor is checked for name,
    shape and dtype, and the optimizer's parameter groups and the hook count against the saved
    ones, before anything is changed."""
    path = Path(folder)
    state = verify_checkpoint(path)
    rank, world = dist_rank_world()
    if state.get("world_size") != world:
        raise CheckpointError(
            f"{path} was written by a run of {state.get('world_size')} process(es), this one has "
            f"{world}; resume with as many (--nproc {state.get('world_size')}): each process has "
            "its own generator state"
        )
    saved = _load(path / MODEL_FILE)
    live = training_tensors(model)
    if set(saved) != set(live):
        missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
        raise CheckpointError(
            f"{path / MODEL_FILE} does not match this model (missing {missing[:3]}, unexpected "
            f"{extra[:3]}); was it written with another method or model?"
        )
    for k, t in saved.items():
        if t.shape != live[k].shape or t.dtype != live[k].dtype:
            raise CheckpointError(
                f"{path / MODEL_FILE}: {k} is {t.dtype} {tuple(t.shape)}, the model has "
                f"{live[k].dtype} {tuple(live[k].shape)}"
            )
    opt_file = path / OPTIMIZER_JSON
    opt_tensors = _load(path / OPTIMIZER_TENSORS)
    try:
        skeleton = json.loads(opt_file.read_text(encoding="utf-8"))
        opt_sd = unflatten_state(skeleton, opt_tensors)
        opt_sd["state"] = {int(k): v for k, v in opt_sd["state"].items()}
        saved_sizes = [len(g["params"]) for g in opt_sd["param_groups"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{opt_file}: not an optimizer state ({type(e).__name__}: {e})"
        ) from e
    live_sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != live_sizes:
        raise CheckpointError(
            f"{opt_file}: parameter groups of {saved_sizes} parameters, this optimizer has "
            f"{live_sizes}; build the optimizer as the run did (same method, --loraplus-ratio)"
        )
    model_state = get_state(model, required=False)
    hooks = model_state.hooks if model_state is not None else []
    hook_states = opt_sd.get(STATE_KEY)
    n_saved = len(hook_states) if isinstance(hook_states, list) else None
    if (hooks or n_saved) and n_saved != len(hooks):
        raise CheckpointError(
            f"{opt_file}: holds {'no' if n_saved is None else n_saved} training-hook states, the "
            f"model has {len(hooks)}; was it saved from another adapter (or without "
            "peftkit.attach)?"
        )
    rng = _load(path / RNG_FILE)
    cpu_rng = rng.get(f"rank{rank}.cpu")
    if cpu_rng is None:
        raise CheckpointError(f"{path / RNG_FILE}: no generator state for rank {rank}")
    if model_state is not None:
        attach(optimizer, model)  # idempotent; without it the hook states would be dropped
    for k, t in saved.items():
        live[k].copy_(_like(t, live[k]))
    params = [p for g in optimizer.param_groups for p in g["params"]]  # the state's indices
    for i, per_param in sorted(opt_sd["state"].items()):
        if 0 <= i < len(params) and getattr(params[i], "device_mesh", None) is not None:
            for name, v in sorted(per_param.items()):
                if isinstance(v, Tensor) and v.shape == params[i].shape:  # exp_avg, not step
                    per_param[name] = _like(v, params[i])
    optimizer.load_state_dict(opt_sd)
    torch.set_rng_state(cpu_rng)
    if torch.cuda.is_available():
        cuda = [
            rng[f"rank{rank}.cuda{i}"]
            for i in range(torch.cuda.device_count())
            if f"rank{rank}.cuda{i}" in rng
        ]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return state


__all__ = [
    "CheckpointError",
    "checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "training_tensors",
    "verify_checkpoint",
]
