"""``adapt`` and ``unload``: find the targets, wrap them in place, freeze everything else."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .config import AdapterConfig
from .core import (
    DEFAULT,
    NF4,
    STATE_ATTR,
    AdaptedLayer,
    Adapter,
    AdapterState,
    ModelState,
    ModulesToSave,
    adapted_layers,
    adapters,
    base_dtype,
    check_name,
    focused,
    get_state,
    layer_kind,
    model_state,
    modules_to_save,
    unwrap,
)
from .methods import METHODS
from .methods.registry import LayerSpec
from .precision import upcast_modules_to_save

SHARED_ATTR = "peftkit_shared"
#: Adapter names become folder names (PEFT's multi-adapter layout): keep them path-safe.
NAME_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,99}")
RESERVED = frozenset({"__base__"})
#: Called with the model after every ``adapt`` and after the last adapter is removed; modules of a
#: higher layer register here (``peftkit.pretrained`` gives an adapted HF model a
#: ``save_pretrained`` that writes adapters), so this module imports none of them.
ON_ADAPTED: list[Callable[[nn.Module], None]] = []
ON_UNLOADED: list[Callable[[nn.Module], None]] = []


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
    inside: list[str] = []  # the insides of adapted layers and modules_to_save wrappers
    for name, module in model.named_modules():
        if not name or isinstance(module, Adapter) or any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, (AdaptedLayer, ModulesToSave)):
            inside.append(name + ".")
            if isinstance(module, ModulesToSave):
                continue
        kind_of = module.base if isinstance(module, AdaptedLayer) else module
        if tm == "all-linear":
            if layer_kind(kind_of) not in ("linear", "conv1d", NF4) or head in (kind_of, module):
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
        if layer_kind(kind_of) is None:
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


def _check_new_name(name: object, state: ModelState | None) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in RESERVED:
        raise ValueError(
            f"adapter name {name!r} is not usable: names become folder names, so use letters, "
            "digits, '_', '-' and '.' (not starting with '.'); '__base__' is reserved"
        )
    if state is not None and name in state.adapters:
        raise ValueError(
            f"the model already has an adapter named {name!r} (it has {state.names()}); choose "
            "another name or peftkit.delete_adapter(model, name) first"
        )
    return name


def _shared_holder(root: nn.Module) -> nn.ModuleDict:
    holder = getattr(root, SHARED_ATTR, None)
    if not isinstance(holder, nn.ModuleDict):
        holder = nn.ModuleDict()
        root.add_module(SHARED_ATTR, holder)
    return holder


def adapt(model: nn.Module, config: AdapterConfig, *, name: str = DEFAULT) -> nn.Module:
    """Wrap the targets of ``config`` in place as adapter ``name`` and return the same model.

    The first adapter is active and trainable, and every other parameter is frozen. Calling
    ``adapt`` again with another name adds another adapter (same or other targets, any method,
    any rank): it is trainable but not active, so the model's outputs do not change until
    :func:`set_adapter` (or :func:`peftkit.route`) selects it. A name already in use is a
    ``ValueError``.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a peftkit config (e.g. LoraConfig), got {type(config)}")
    root = unwrap(model)
    state = get_state(root, required=False)
    name = _check_new_name(name, state)
    method = METHODS.get(config.method)
    if method is None:
        raise ValueError(f"no method {config.method!r}; known: {', '.join(sorted(METHODS))}")
    targets = find_targets(root, config)
    if state is not None:
        _check_compatible(root, state, name, config, targets)
    if method.check is not None:
        method.check(root, config, targets)
    saved: list[str] = []
    if config.modules_to_save:
        saved = [
            n
            for n, m in root.named_modules()
            if n
            and _tail_match(n, config.modules_to_save)
            and not _inside_saved(root, n)
            and not any(n.startswith(t + ".") or n == t for t, _ in targets)
        ]
        nested = [n for n in saved if any(n.startswith(o + ".") for o in saved)]
        saved = [n for n in saved if n not in nested]
        if not saved:
            raise ValueError(
                f"modules_to_save={list(config.modules_to_save)!r} matches no module of the model"
            )

    first = state is None
    if first:
        for p in root.parameters():
            p.requires_grad_(False)
        state = ModelState()
    assert state is not None
    before = {id(m) for _, m in modules_to_save(root)}
    shared = method.prepare(root, config, targets) if method.prepare is not None else None
    for _, m in modules_to_save(root):
        if id(m) not in before and name != DEFAULT and DEFAULT in m.copies:
            m.copies[name] = m.copies.pop(DEFAULT)  # prepare() wrapped it (LongLoRA's trainable)
    if shared is not None:
        _shared_holder(root)[name] = shared
    wrapped: list[tuple[str, Adapter]] = []
    holders: list[AdaptedLayer] = []
    for path, module in targets:
        holder = module if isinstance(module, AdaptedLayer) else None
        base = holder.base if holder is not None else module
        layer = method.make_layer(base, config, LayerSpec(name=path, shared=shared))
        layer.train(base.training)  # an adapter follows its layer's train/eval mode
        if holder is None:
            holder = AdaptedLayer(base).train(base.training)
            _set_module(root, path, holder)
        holder.add(name, layer)
        holder.model_state = state
        wrapped.append((path, layer))
        holders.append(holder)
    for path in saved:
        m = root.get_submodule(path)
        if isinstance(m, ModulesToSave):
            m.add(name)
        else:
            m = ModulesToSave(m, name).train(m.training)
            _set_module(root, path, m)
    # every wrapper reads routes from the model's state (prepare() may have made some: LongLoRA);
    # which copies are active is set below, with the layers' active adapters
    for _, m in modules_to_save(root):
        m.model_state = state
    upcast_modules_to_save(root, config)  # fp32 trained copies on fp16/bf16 models
    owners: dict[int, int] = {}
    for m in root.modules():
        if not isinstance(m, (Adapter, AdaptedLayer)):
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
    entry = AdapterState(config=config, shared=shared)
    state.adapters[name] = entry
    if first:
        state.active = [name]
    state.generation += 1
    object.__setattr__(root, STATE_ATTR, state)
    for call in ON_ADAPTED:
        call(root)
    _apply_active(root, state)
    if method.make_hook is not None:
        with focused(root, name):
            hook = method.make_hook(root, config, wrapped)
        if hook is not None:
            entry.hooks.append(hook)
    return model


def _inside_saved(root: nn.Module, path: str) -> bool:
    """Whether ``path`` is a ModulesToSave's internal module (its original or a copy)."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        if isinstance(root.get_submodule(".".join(parts[:i])), ModulesToSave):
            return True
    return False


def _check_compatible(
    root: nn.Module,
    state: ModelState,
    name: str,
    config: AdapterConfig,
    targets: list[tuple[str, nn.Module]],
) -> None:
    """A second adapter may go anywhere, except where sharing a layer would be wrong."""
    new = METHODS[config.method]
    for path, module in targets:
        if not isinstance(module, AdaptedLayer):
            continue
        if any(a.merged for a in module.adapters.values()):
            raise ValueError(
                f"{path} holds a merged adapter; call peftkit.unmerge(model) before adding "
                f"adapter {name!r}"
            )
        for other, _a in module.adapters.items():
            old = METHODS[state.adapters[other].config.method]
            if new.mutates_base or old.mutates_base:
                raise ValueError(
                    f"{path}: Delta-LoRA changes the base weight itself, so it cannot share a "
                    f"layer with another adapter ({other!r} and {name!r}); export it with "
                    "peftkit.export_lora (an exact rank-2r LoRA) and load that instead"
                )
    if new.prepare is not None and config.method == "longlora":
        if any(s.config.method == "longlora" for s in state.adapters.values()):
            raise ValueError(
                "the model already has a LongLoRA adapter; its attention and position changes "
                "are model-wide, so a second one cannot be added"
            )


def _apply_active(root: nn.Module, state: ModelState) -> None:
    layers, copies = state.parts(root)
    for _, layer in layers:
        layer.active = [n for n in state.active if n in layer.adapters]
    for _, m in copies:
        m.active = [n for n in state.active if n in m.copies]


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, in the order they were added (their ids in :func:`peftkit.route`)."""
    state = get_state(model, required=False)
    return state.names() if state is not None else []


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters whose updates the model applies now (several add, as in PEFT)."""
    state = get_state(model, required=False)
    return list(state.active) if state is not None else []


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make ``names`` (one name or a list) the active adapters; several active adapters add their
    updates. Which parameters train does not change (unlike PEFT, activating an adapter does not
    make it trainable: use ``requires_grad_`` for that)."""
    state = model_state(model)
    wanted = [names] if isinstance(names, str) else list(names)
    for n in wanted:
        check_name(model, n)
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"set_adapter got a name twice: {wanted}")
    state.active = wanted  # Note: no new generation: which adapters are active changes no cache
    _apply_active(unwrap(model), state)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` and free its tensors. Deleting the last adapter gives back the
    base model (as :func:`unload`). A merged adapter is refused (unmerge first)."""
    root = unwrap(model)
    state = model_state(root)
    check_name(root, name)
    if any(a.merged for _, a in adapters(root, name)):
        raise ValueError(f"adapter {name!r} is merged; call peftkit.unmerge(model) first")
    if len(state.adapters) == 1:
        return unload(model)
    for path, layer in list(adapted_layers(root)):
        if name in layer.adapters:
            layer.adapters[name].on_unload()
            del layer.adapters[name]
            if not layer.adapters:
                _set_module(root, path, layer.base)
    for path, m in list(modules_to_save(root)):
        if name in m.copies:
            del m.copies[name]
            if not m.copies:
                _set_module(root, path, m.original)
    holder = getattr(root, SHARED_ATTR, None)
    if isinstance(holder, nn.ModuleDict) and name in holder:
        shared_unload = getattr(holder[name], "on_unload", None)
        if callable(shared_unload):
            shared_unload(root, merged=False)
        del holder[name]
    del state.adapters[name]
    state.active = [n for n in state.active if n != name]
    state.generation += 1
    _apply_active(root, state)
    return model


def _restore(model: nn.Module, *, merged: bool) -> nn.Module:
    root = unwrap(model)
    get_state(root)
    for path, holder in list(adapted_layers(root)):
        for layer in holder.adapters.values():
            if merged and not layer.merged:
                layer.merge()
            if not merged and layer.merged:
                layer.unmerge()
            if not merged:
                layer.on_unload()
        _set_module(root, path, holder.base)
    for path, m in list(modules_to_save(root)):
        keep = m.trained if merged else m.original
        for p in keep.parameters():
            p.requires_grad_(False)
        _set_module(root, path, keep)
    holder_ = getattr(root, SHARED_ATTR, None)
    if isinstance(holder_, nn.ModuleDict):
        for shared in holder_.values():
            shared_unload = getattr(shared, "on_unload", None)
            if callable(shared_unload):
                shared_unload(root, merged=merged)  # undoes its model-level changes
    if hasattr(root, SHARED_ATTR):
        delattr(root, SHARED_ATTR)
    object.__delattr__(root, STATE_ATTR)
    for call in ON_UNLOADED:
        call(root)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Put the original modules back (unmerging first if needed), dropping every adapter;
    returns the same model."""
    return _restore(model, merged=False)


@torch.no_grad()
def merge_and_unload(
    model: nn.Module,
    *,
    name: str | None = None,
    dtype: torch.dtype | None = None,
    probe: Tensor | dict[str, Tensor] | None = None,
    atol: float = 1e-4,
) -> nn.Module:
    """Merge the active adapters (or adapter ``name``) into their bases and remove every
    wrapper: a plain model with zero inference latency. Other adapters are dropped; the merged
    adapters' ``modules_to_save`` copies replace their originals.

    An NF4 base is dequantised and replaced by a plain ``nn.Linear`` of ``dtype`` (default: its
    compute dtype) holding ``dequant(W) + ΔW``. With ``probe`` (an input batch, or the keyword
    arguments of one), the merged model's output is checked against the adapted model's before
    returning, and a difference above ``atol`` raises instead of returning a wrong model.
    """
    root = unwrap(model)
    state = model_state(root)
    if name is not None:
        check_name(root, name)
        set_adapter(root, name)
    keep = list(state.active)
    if not keep:
        raise ValueError("no adapter is active; pass name= or call peftkit.set_adapter first")
    was_training = root.training
    expected = None
    if probe is not None:
        root.eval()
        expected = _logits(root(**probe) if isinstance(probe, dict) else root(probe))
    for other in [n for n in state.names() if n not in keep]:
        if any(a.merged for _, a in adapters(root, other)):
            raise ValueError(f"adapter {other!r} is merged but not active; unmerge(model) first")
        delete_adapter(root, other)
    nf4_dtypes: dict[str, torch.dtype] = {}
    for path, holder in list(adapted_layers(root)):
        if layer_kind(holder.base) == NF4:
            nf4_dtypes[path] = dtype or base_dtype(holder.base)
            w = holder.base.dequantize()  # type: ignore[operator]
            dense = _dense_from_nf4(holder.base, w, torch.promote_types(w.dtype, torch.float32))
            holder.base = dense
            for a in holder.adapters.values():
                a.base = dense
                a.kind = "linear"
        for a in holder.adapters.values():
            if not a.merged:
                a.merge()
    tied = any(a.weight_tied for _, a in adapters(root))
    _restore(root, merged=True)
    for path, out_dtype in nf4_dtypes.items():
        lin = root.get_submodule(path)
        for t in lin.parameters():
            t.data = t.data.to(out_dtype)
    for path, m in list(root.named_modules()):
        if path and layer_kind(m) == NF4:  # a plain model: no quantised layer left behind
            _set_module(root, path, _dense_from_nf4(m, m.dequantize(), dtype))
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
