"""Adapter files in Hugging Face PEFT's layout: ``adapter_config.json`` +
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.<suffix>``.

Loading is strict (a missing, unexpected or mis-shaped tensor is an error listing the difference),
writing is atomic (temp file, fsync, rename: an interrupted save leaves the previous adapter
intact), and only JSON and safetensors are ever read, so adapter files never execute code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .core import (
    CONV1D,
    DEFAULT,
    EMBEDDING,
    PEFT_PREFIX,
    Adapter,
    adapters,
    focused,
    model_state,
    modules_to_save,
    stored_weight,
    unwrap,
)
from .files import is_writer, write_files
from .inject import adapt, delete_adapter
from .methods import METHODS, method_for_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = PEFT_PREFIX


def _get(module: nn.Module, dotted: str) -> Tensor:
    owner, _, leaf = dotted.rpartition(".")
    m = module.get_submodule(owner) if owner else module
    t = getattr(m, leaf)
    if not isinstance(t, Tensor):
        raise TypeError(f"{dotted} is not a tensor")
    return t


def adapter_tensors(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """One adapter's tensors under their PEFT keys (live tensors, not copies); ``name``
    defaults to the focused, the only or the first active adapter."""
    root = unwrap(model)
    state = model_state(root)
    current = state.resolve(name)
    out: dict[str, Tensor] = {}
    for path, layer in adapters(root, current):
        for local, suffix in layer.peft_keys().items():
            out[f"{PREFIX}{path}.{suffix}"] = _get(layer, local)
    for path, m in modules_to_save(root):
        if current in m.copies:
            for pname, t in m.copies[current].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{pname}"] = t
    shared = state.adapters[current].shared
    keys = getattr(shared, "peft_keys", None)
    if shared is not None and callable(keys):
        for local, key in keys().items():
            out[key] = _get(shared, local)
    return out


def _full(t: Tensor) -> Tensor:
    # Note: an FSDP2 parameter is a DTensor shard; gather it (a collective: every rank calls this).
    full = getattr(t, "full_tensor", None)
    t = full() if callable(full) else t
    return t.detach().to("cpu").clone().contiguous()


def write_adapter_files(
    directory: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, Tensor]
) -> Path:
    """Write a config dict and tensors as a PEFT adapter folder, atomically (rank 0 only)."""
    tensors = {k: _full(v) for k, v in tensors.items()}
    for k, v in tensors.items():
        # Note: ZeRO-3/FSDP1 leave 1-D size-0 placeholders; a 2-D tensor with a zero dimension is
        # a real shape (an AdaLoRA layer pruned to rank 0, which PEFT writes and reads).
        if v.numel() == 0 and v.dim() < 2:
            raise ValueError(f"refusing to write an empty tensor for {k} (a sharded save?)")
    out = Path(directory)
    if not is_writer():
        return out
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    write_files(out, {CONFIG_NAME: config}, {WEIGHTS_NAME: tensors})
    return out


def config_dict(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    root = unwrap(model)
    state = model_state(root)
    current = state.resolve(name)
    d = state.adapters[current].config.to_dict()
    layers = list(adapters(root, current))
    if d.get("target_modules") == "all-linear":
        d["target_modules"] = [path for path, _ in layers]  # as PEFT saves it
    d["fan_in_fan_out"] = any(a.kind == CONV1D for _, a in layers)
    d["base_model_name_or_path"] = getattr(root, "name_or_path", None) or None
    return d


def save_adapter(
    model: nn.Module, directory: str | os.PathLike[str], *, name: str | None = None
) -> Path:
    """Write adapters as ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's
    layout; PEFT's ``PeftModel.from_pretrained`` loads it). Atomic per file; under FSDP2 the
    shards are gathered and rank 0 alone writes.

    With ``name``, that adapter alone is written at ``directory``. Without it, a model with one
    adapter writes it there, and a model with several writes PEFT's multi-adapter layout: the
    adapter named ``"default"`` at ``directory`` and every other one in ``directory/<name>/``
    (PEFT reads those with ``load_adapter(directory/<name>, adapter_name=<name>)``)."""
    root = unwrap(model)
    state = model_state(root)
    if name is not None or len(state.adapters) == 1:
        return _save_one(root, directory, name)
    out = Path(directory)
    for n in state.names():
        _save_one(root, out if n == DEFAULT else out / n, n)
    return out


def _save_one(root: nn.Module, directory: str | os.PathLike[str], name: str | None) -> Path:
    state = model_state(root)
    current = state.resolve(name)
    with focused(root, current):  # the method's on_save sees this adapter alone
        d = config_dict(root)
        tensors = dict(adapter_tensors(root))
        method = METHODS[state.adapters[current].config.method]
        if method.on_save is not None:
            method.on_save(root, d, tensors)
    return write_adapter_files(directory, d, tensors)


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter folder, with one-line errors."""
    path = Path(directory)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such adapter directory")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a directory; pass the adapter folder")
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg}: missing; {path} is not an adapter folder")
    try:
        d = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{cfg}: expected a JSON object, got {type(d).__name__}")
    return d


def read_adapter_tensors(directory: str | os.PathLike[str]) -> dict[str, Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (peftkit reads safetensors only, never pickle)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: unreadable or corrupted safetensors file ({e})") from None


def _adapter_at(root: nn.Module, path: str) -> Adapter:
    state = model_state(root)
    found = [a for p, a in adapters(root, state.current()) if p == path]
    assert len(found) == 1
    return found[0]


def _diff_message(
    path: Path,
    missing: list[str],
    unexpected: list[str],
    shapes: list[str],
    dtypes: tuple[str, ...] | list[str] = (),
) -> str:
    parts = [f"{path}: tensors do not match the adapted model"]
    labelled = (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", shapes),
        ("non-floating dtype", dtypes),
    )
    for label, items in labelled:
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            parts.append(f"{label}: {', '.join(sorted(items)[:8])}{more}")
    return "; ".join(parts)


def adapter_folders(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """The adapters in a folder that PEFT or :func:`save_adapter` wrote: ``"default"`` for the
    folder itself (when it holds an ``adapter_config.json``) and each subfolder that holds one,
    by its name."""
    path = Path(directory)
    found: dict[str, Path] = {}
    if (path / CONFIG_NAME).is_file():
        found[DEFAULT] = path
    if path.is_dir():
        for sub in sorted(path.iterdir()):
            if sub.is_dir() and (sub / CONFIG_NAME).is_file():
                found[sub.name] = sub
    return found


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    name: str | None = None,
    trainable: bool = False,
) -> nn.Module:
    """Load the adapter in ``directory`` (peftkit's or PEFT's files) as adapter ``name``,
    strictly: adapts the model from the folder's config, then loads every tensor.

    ``name=None`` loads the whole folder: the adapter at its root as ``"default"`` and each
    subfolder adapter (PEFT's multi-adapter layout) under its folder's name. An adapted model
    gets them as more adapters (a name in use is an error); a model with no adapter gets the
    first one active. With ``trainable=False`` the loaded adapters are frozen and the model is
    put in eval mode, as PEFT's ``from_pretrained`` does. On any error the model is left as it
    was."""
    if name is not None:
        return _load_one(model, directory, name, trainable)
    found = adapter_folders(directory)
    if not found:
        read_adapter_config(directory)  # the one-line error for a missing/odd folder
    done: list[str] = []
    try:
        for n, path in found.items():
            _load_one(model, path, n, trainable)
            done.append(n)
    except BaseException:
        for n in reversed(done):
            delete_adapter(model, n)
        raise
    return model


def _load_one(
    model: nn.Module, directory: str | os.PathLike[str], name: str, trainable: bool
) -> nn.Module:
    d = read_adapter_config(directory)
    source = str(Path(directory) / CONFIG_NAME)
    method = method_for_dict(d, source=source)
    config = method.config_cls.from_dict(d, source=source)
    tensors = read_adapter_tensors(directory)
    try:
        adapt(model, config, name=name)
    except (ValueError, TypeError) as e:
        # Note: e.g. target_modules naming modules this model lacks: say which file asked.
        raise type(e)(f"{source}: {e}") from None
    try:
        with focused(model, name):
            _load_tensors(model, d, tensors, Path(directory) / WEIGHTS_NAME)
    except BaseException:
        delete_adapter(model, name)
        raise
    root = unwrap(model)
    if not trainable:
        for _, a in adapters(root, name):
            for p in a.parameters():
                p.requires_grad_(False)
        for _, m in modules_to_save(root):
            if name in m.copies:
                m.copies[name].requires_grad_(False)
        root.eval()
    return model


@torch.no_grad()
def _load_tensors(
    model: nn.Module, d: dict[str, Any], tensors: dict[str, Tensor], path: Path
) -> None:
    root = unwrap(model)
    state = model_state(root)
    method = METHODS[state.config.method]
    if method.on_load is not None:
        tensors = method.on_load(root, d, tensors)
    expected = adapter_tensors(root)
    given: dict[str, Tensor] = {}
    base_weights: dict[str, Tensor] = {}
    layer_names = {path for path, a in adapters(root, state.current()) if a.kind == EMBEDDING}
    for k, v in tensors.items():
        key = k if k in expected else k.replace(".default.", ".")
        if (
            key.endswith(".base_layer.weight")
            and key[len(PREFIX) : -len(".base_layer.weight")] in layer_names
        ):
            # PEFT writes the full embedding next to an embedding LoRA; it must be the base's.
            base_weights[key[len(PREFIX) : -len(".base_layer.weight")]] = v
            continue
        given[key] = v
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} vs {tuple(t.shape)}"
        for k, t in expected.items()
        if k in given and given[k].shape != t.shape
    ]
    for name, w in base_weights.items():
        bw = stored_weight(_adapter_at(root, name).base)
        if w.shape != bw.shape:
            shapes.append(f"{name}.base_layer.weight {tuple(w.shape)} vs {tuple(bw.shape)}")
    # Note: float16/bfloat16 files into float32 layers are cast (PEFT saves half precision), but
    # integer or bool tensors into floating parameters are refused, never silently cast.
    dtypes = [
        f"{k} {given[k].dtype} vs {t.dtype}"
        for k, t in expected.items()
        if k in given and t.is_floating_point() and not given[k].is_floating_point()
    ]
    dtypes += [
        f"{name}.base_layer.weight {w.dtype} vs {bw.dtype}"
        for name, w in base_weights.items()
        if (bw := stored_weight(_adapter_at(root, name).base)).is_floating_point()
        and not w.is_floating_point()
    ]
    if missing or unexpected or shapes or dtypes:
        raise ValueError(_diff_message(path, missing, unexpected, shapes, dtypes))
    for k, t in expected.items():
        t.copy_(given[k].to(t.dtype))
    for name, w in base_weights.items():
        stored_weight(_adapter_at(root, name).base).copy_(w)


def export_lora(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    rank: int | None = None,
    name: str | None = None,
) -> Path:
    """Write a plain PEFT LoRA that reproduces adapter ``name``'s outputs (default: the only or
    the first active adapter).

    Each adapter gives exact factors ``B A = ΔW`` (the scale folded into B, so ``lora_alpha``
    equals each module's rank); ranks that differ per module go to ``rank_pattern`` and
    ``alpha_pattern``. ``rank`` truncates where the method allows it (DyLoRA); a method whose ΔW
    has no exact low-rank form raises and names ``merge_and_unload`` instead.
    """
    root = unwrap(model)
    state = model_state(root)
    current = state.resolve(name)
    factors: dict[str, tuple[Tensor, Tensor, bool]] = {}
    for path, layer in adapters(root, current):
        a, b = layer.lora_factors(rank)
        factors[path] = (a, b, layer.kind == EMBEDDING)
    if not factors:
        raise ValueError("model has no adapter layers to export")
    ranks = {name: int(a.shape[0]) for name, (a, _, _) in factors.items()}
    r = max(ranks.values())
    tensors: dict[str, Tensor] = {}
    for name, (a, b, emb) in factors.items():
        ka, kb = (
            ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PREFIX}{name}.{ka}"] = a
        tensors[f"{PREFIX}{name}.{kb}"] = b
    saved = [(path, m) for path, m in modules_to_save(root) if current in m.copies]
    for path, m in saved:
        for pname, t in m.copies[current].state_dict().items():
            tensors[f"{PREFIX}{path}.{pname}"] = t
    d: dict[str, Any] = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "target_modules": sorted(factors),
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: k for n, k in ranks.items() if k != r},
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "bias": "none",
        # Note: every module trained in full, by path (LongLoRA's ``trainable`` adds some that
        # ``config.modules_to_save`` does not name); the tensors above hold all of them.
        "modules_to_save": [path for path, _ in saved] or None,
        "fan_in_fan_out": any(a.kind == CONV1D for _, a in adapters(root, current)),
        "base_model_name_or_path": getattr(root, "name_or_path", None) or None,
        "task_type": None,
        "inference_mode": True,
    }
    return write_adapter_files(directory, d, tensors)
