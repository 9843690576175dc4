"""``adapt`` and ``unload``: find the targets, wrap them in place, freeze everything else."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import pretrained
from .config import AdapterConfig
from .core import (
    NF4,
    STATE_ATTR,
    Adapter,
    AdapterState,
    ModulesToSave,
    adapters,
    base_dtype,
    get_state,
    layer_kind,
    unwrap,
)
from .methods import METHODS
from .methods.registry import LayerSpec
from .precision import upcast_modules_to_save

SHARED_ATTR = "peftkit_shared"


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            return head
    return (
        getattr(model, "lm_head", None)
        if isinstance(getattr(model, "lm_head", None), nn.Module)
        else None
    )


def _tail_match(name: str, keys: Iterable[str]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


def _layer_index(name: str, patterns: tuple[str, ...] | None) -> int | None:
    alts = "|".join(re.escape(p) for p in patterns) if patterns else r"[^.]*"
    m = re.match(rf"(?:.*\.)?(?:{alts})\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _is_excluded(name: str, config: AdapterConfig) -> bool:
    ex = config.exclude_modules
    if ex is None:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return _tail_match(name, ex)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """The ``(path, module)`` pairs ``config.target_modules`` selects, with clear errors for a
    selection that is empty or holds a layer type peftkit cannot wrap."""
    tm = config.target_modules
    head = _output_head(model)
    saved = config.modules_to_save or ()
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, (Adapter, ModulesToSave)):
            continue
        if tm == "all-linear":
            if layer_kind(module) not in ("linear", "conv1d", NF4) or module is head:
                continue
            if _tail_match(name, saved):
                continue
        elif isinstance(tm, str):
            if re.fullmatch(tm, name) is None:
                continue
        else:
            assert tm is not None
            if not _tail_match(name, tm):
                continue
        if _is_excluded(name, config):
            continue
        if config.layers_to_transform is not None:
            idx = _layer_index(name, config.layers_pattern)
            if idx is None or idx not in config.layers_to_transform:
                continue
        if layer_kind(module) is None:
            raise TypeError(
                f"target {name!r} is a {type(module).__name__}; peftkit wraps nn.Linear, "
                "GPT-2 Conv1D, nn.Embedding and NF4Linear. Narrow target_modules to those layers."
            )
        found.append((name, module))
    if not found:
        leaves = [n for n, m in model.named_modules() if n and layer_kind(m) is not None]
        tails = sorted({n.rsplit(".", 1)[-1] for n in leaves})
        raise ValueError(
            f"target_modules={tm!r} matches no module"
            + (
                f" (with layers_to_transform={config.layers_to_transform!r})"
                if config.layers_to_transform is not None
                else ""
            )
            + f"; wrappable modules here include {tails[:12]} (e.g. {leaves[:3]})"
        )
    return found


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


def adapt(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap the targets of ``config`` in place and return the same model.

    Every parameter outside the adapters (and ``modules_to_save`` copies) is frozen. One adapter
    per model: adapting an adapted model is an error (``unload`` first).
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a peftkit config (e.g. LoraConfig), got {type(config)}")
    root = unwrap(model)
    if getattr(root, STATE_ATTR, None) is not None or any(True for _ in adapters(root)):
        raise ValueError("model already has a peftkit adapter; call peftkit.unload(model) first")
    method = METHODS.get(config.method)
    if method is None:
        raise ValueError(f"no method {config.method!r}; known: {', '.join(sorted(METHODS))}")
    targets = find_targets(root, config)
    if method.check is not None:
        method.check(root, config, targets)
    saved: list[str] = []
    if config.modules_to_save:
        saved = [
            n
            for n, m in root.named_modules()
            if n
            and _tail_match(n, config.modules_to_save)
            and not isinstance(m, ModulesToSave)
            and not any(n.startswith(t + ".") or n == t for t, _ in targets)
        ]
        nested = [n for n in saved if any(n.startswith(o + ".") for o in saved)]
        saved = [n for n in saved if n not in nested]
        if not saved:
            raise ValueError(
                f"modules_to_save={list(config.modules_to_save)!r} matches no module of the model"
            )

    for p in root.parameters():
        p.requires_grad_(False)
    shared = method.prepare(root, config, targets) if method.prepare is not None else None
    if shared is not None:
        root.add_module(SHARED_ATTR, shared)
    wrapped: list[tuple[str, Adapter]] = []
    for name, module in targets:
        layer = method.make_layer(module, config, LayerSpec(name=name, shared=shared))
        layer.train(module.training)  # an adapter follows its layer's train/eval mode
        _set_module(root, name, layer)
        wrapped.append((name, layer))
    for name in saved:
        original = root.get_submodule(name)
        _set_module(root, name, ModulesToSave(original).train(original.training))
    upcast_modules_to_save(root, config)  # issue 17: fp32 trained copies on fp16/bf16 models
    owners: dict[int, int] = {}
    for m in root.modules():
        if not isinstance(m, Adapter):
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
    for _, layer in wrapped:
        w = getattr(layer.base, "weight", None)
        layer.weight_tied = w is not None and owners.get(id(w), 0) > 1
    for _, layer in wrapped:
        for pname in layer.trainable_names():
            param = getattr(layer, pname, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(True)
    state = AdapterState(config=config, shared=shared)
    if method.make_hook is not None:
        hook = method.make_hook(root, config, wrapped)
        if hook is not None:
            state.hooks.append(hook)
    object.__setattr__(root, STATE_ATTR, state)
    pretrained.install(root)  # issue 17: save_pretrained writes the adapter, not a broken model
    return model


def _restore(model: nn.Module, *, merged: bool) -> nn.Module:
    root = unwrap(model)
    get_state(root)
    for name, layer in list(adapters(root)):
        if merged and not layer.merged:
            layer.merge()
        if not merged and layer.merged:
            layer.unmerge()
        if not merged:
            layer.on_unload()
        _set_module(root, name, layer.base)
    for name, m in list(root.named_modules()):
        if isinstance(m, ModulesToSave):
            keep = m.trained if merged else m.original
            for p in keep.parameters():
                p.requires_grad_(False)
            _set_module(root, name, keep)
    shared_unload = getattr(getattr(root, SHARED_ATTR, None), "on_unload", None)
    if callable(shared_unload):
        shared_unload(root, merged=merged)  # the shared module undoes its model-level changes
    if hasattr(root, SHARED_ATTR):
        delattr(root, SHARED_ATTR)
    object.__delattr__(root, STATE_ATTR)
    pretrained.remove(root)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Put the original modules back (unmerging first if needed); returns the same model."""
    return _restore(model, merged=False)


@torch.no_grad()
def merge_and_unload(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    probe: Tensor | dict[str, Tensor] | None = None,
    atol: float = 1e-4,
) -> nn.Module:
    """Merge every adapter into its base and remove the wrappers: a plain model with zero
    inference latency. ``modules_to_save`` copies replace their originals.

    An NF4 base is dequantised and replaced by a plain ``nn.Linear`` of ``dtype`` (default: its
    compute dtype) holding ``dequant(W) + ΔW``. With ``probe`` (an input batch, or the keyword
    arguments of one), the merged model's output is checked against the adapted model's before
    returning, and a difference above ``atol`` raises instead of returning a wrong model.
    """
    root = unwrap(model)
    get_state(root)
    was_training = root.training
    expected = None
    if probe is not None:
        root.eval()
        expected = _logits(root(**probe) if isinstance(probe, dict) else root(probe))
    for name, layer in list(adapters(root)):
        if layer.merged:
            continue
        if layer.kind == NF4:
            _set_module_and_merge_nf4(root, name, layer, dtype)
            continue
        layer.merge()
    tied = any(a.weight_tied for _, a in adapters(root))
    _restore(root, merged=True)
    for name, m in list(root.named_modules()):
        if name and layer_kind(m) == NF4:  # a plain model: no quantised layer left behind
            _set_module(root, name, _dense_from_nf4(m, m.dequantize(), dtype))
    cfg = getattr(root, "config", None)
    if tied and cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        cfg.tie_word_embeddings = False  # the merged embedding no longer equals the head
    if dtype is not None:
        _cast_floating(root, dtype)
    if expected is not None:
        got = _logits(root(**probe) if isinstance(probe, dict) else root(probe))
        diff = (got.float() - expected.float()).abs().max().item()
        if not diff <= atol:
            raise ValueError(
                f"merged model differs from the adapted model by {diff:.3g} (> atol={atol:g}) on "
                "the probe batch; the merge is wrong or the dtype too coarse"
            )
    root.train(was_training)
    return model


def _logits(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if isinstance(t, Tensor):
            return t
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot find a tensor output in {type(out).__name__} to compare")


def _cast_floating(root: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and buffers to ``dtype``, leaving quantised layers alone."""
    quantised = {id(t) for m in root.modules() if layer_kind(m) == NF4 for t in m.buffers()}
    for m in root.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is None or not t.is_floating_point() or id(t) in quantised:
                continue
            t.data = t.data.to(dtype)


def _dense_from_nf4(base: nn.Module, weight: Tensor, dtype: torch.dtype | None) -> nn.Linear:
    """A frozen ``nn.Linear`` holding ``weight`` (dense ``(out, in)``) and ``base``'s bias."""
    out_dtype = dtype or weight.dtype
    bias = getattr(base, "bias", None)
    dense = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=isinstance(bias, Tensor),
        device=weight.device,
        dtype=out_dtype,
    )
    dense.weight.copy_(weight.to(out_dtype))
    if isinstance(bias, Tensor):
        dense.bias.copy_(bias.to(out_dtype))
    return dense.requires_grad_(False).train(base.training)


def _set_module_and_merge_nf4(
    root: nn.Module, name: str, layer: Adapter, dtype: torch.dtype | None
) -> None:
    dense = _dense_from_nf4(layer.base, layer.merged_weight(), dtype or base_dtype(layer.base))
    layer.base = dense
    layer.kind = "linear"
    layer.merged = True
