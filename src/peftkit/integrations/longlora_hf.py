"""LongLoRA on Hugging Face ``transformers`` models, through public extension points only.

**S2-Attn while training.** One attention function and one mask function are registered under the
name ``"peftkit_s2"`` (``transformers.AttentionInterface`` and ``AttentionMaskInterface``); adapting
a model records its attention implementation (``"sdpa"``, ``"eager"``, …) and switches it with
``model.set_attn_implementation("peftkit_s2")``. Every call then dispatches:

- S2-Attn (:func:`peftkit.attention.s2_attention`, groups of ``G = group_size(N, ratio)``) when the
  attention module is causal and in training mode, the adapter is enabled, queries and keys have the
  same length (no KV cache in use) and autograd records the call, or the model uses activation
  checkpointing (whose first pass may run without autograd; both passes must agree);
- otherwise the recorded implementation, with exactly the arguments the base model would pass it:
  eval mode, ``generate`` (it runs under ``no_grad``), every decoding step, ``disable_adapters``.

The mask function returns the recorded implementation's own mask, so the fallback is bit-for-bit
the base model. S2 reads the (B, N) padding mask off that mask's diagonal (a key is a real token
iff it may attend to itself): boolean for sdpa, additive for eager, 2-D for flash attention.

The trap this avoids: transformers skips mask creation for a name unknown to
``AttentionMaskInterface`` and passes ``None``, so padding would be silently ignored.

**Position interpolation.** ``extend_positions`` multiplies the linear RoPE factor of every rotary
embedding's config (``rope_parameters = {"rope_type": "linear", "factor": s, ...}``) and replaces
each rotary module by a :class:`RopeSwitch` holding the original and one rebuilt from the updated
config (rotary modules cache ``inv_freq`` at construction). ``disable_adapters`` switches back to
the original positions; ``unload`` restores both; ``merge_and_unload`` keeps the scaled module and
config, so ``save_pretrained`` writes the factor into ``config.json``.

Limits: S2 ignores a packed-sequence mask (position ids restarting in one row) as the official
code does, refuses attention dropout, soft-capping and sinks, and refuses a group wider than a
sliding window (it would attend past the window).
"""

from __future__ import annotations

import copy
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..attention import s2_attention
from ..core import Switchable

NAME = "peftkit_s2"


def group_size(n: int, ratio: float) -> int:
    """``G = N · ratio`` rounded down to an even number, at least 2 (S2 needs an even group)."""
    return max(2, int(n * ratio) // 2 * 2)


@dataclass
class _Entry:
    """What the registered functions need to know about one adapted model config."""

    config: weakref.ref[Any]
    original: str | None  # the attention implementation before adapting
    holder: weakref.ref[Any]  # the method's shared module: ``disabled``, ``group_size_ratio``
    model: weakref.ref[nn.Module]


# Note: keyed by id(config) and checked against a weak reference, never stored on the config:
# transformers serialises (and deep-copies) every config attribute.
_ENTRIES: dict[int, _Entry] = {}


def _entry(config: Any) -> _Entry:
    entry = _ENTRIES.get(id(config)) if config is not None else None
    if entry is None or entry.config() is not config:
        raise RuntimeError(
            f"attention implementation {NAME!r} is set on a config that no LongLoRA adapter "
            "owns (a deep copy of an adapted model, or a config edited by hand). Adapt the "
            "model with peftkit.adapt, or set model.set_attn_implementation('sdpa')."
        )
    return entry


def _padding(mask: Any, batch: int, n: int) -> Tensor | None:
    """The (B, N) key-padding mask behind the mask the recorded implementation built."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(
            f"S2-Attn cannot read a {type(mask).__name__} attention mask (flex attention); "
            "adapt a model loaded with attn_implementation='sdpa' or 'eager'"
        )
    if mask.dim() == 2:
        return mask.bool()  # flash attention's (B, N) padding mask
    if mask.dim() != 4 or mask.shape[-2:] != (n, n):
        raise ValueError(f"S2-Attn expected a (B, 1, {n}, {n}) mask, got {tuple(mask.shape)}")
    diag = mask[:, 0].diagonal(dim1=-2, dim2=-1)  # (B, N): may query i attend to key i
    if diag.dtype != torch.bool:
        diag = diag > torch.finfo(diag.dtype).min / 2  # additive mask: 0 allowed, min masked
    return diag.expand(batch, n)


def _s2_holder(module: nn.Module, entry: _Entry, query: Tensor, key: Tensor) -> Any:
    """The method's shared module when this call runs S2-Attn, else None."""
    holder = entry.holder()
    if holder is None or holder.disabled or holder.group_size_ratio is None:
        return None
    if not module.training or not getattr(module, "is_causal", False):
        return None
    if query.shape[-2] != key.shape[-2]:
        return None  # decoding with a KV cache
    checkpointing = bool(getattr(entry.model(), "is_activation_checkpointing", False))
    return holder if torch.is_grad_enabled() or checkpointing else None


def s2_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The ``"peftkit_s2"`` attention: q (B, H, N, D), k/v (B, Hk, N, D) → ((B, N, H, D), None)."""
    entry = _entry(getattr(module, "config", None))
    holder = _s2_holder(module, entry, query, key)
    if holder is None:
        # Note: the lookup the base model's attention does, with its own eager fallback.
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        interface: Any = ALL_ATTENTION_FUNCTIONS
        fn = interface.get_interface(entry.original, eager)
        if fn is None:
            raise RuntimeError(f"no attention function for {entry.original!r} in {type(module)}")
        out: tuple[Tensor, Tensor | None] = fn(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        return out
    batch, _, n, _ = query.shape
    g = group_size(n, holder.group_size_ratio)
    if dropout:
        raise ValueError(
            f"S2-Attn has no attention dropout, but {type(module).__name__} asks for p={dropout}; "
            "set attention_dropout=0.0 on the model's attention modules before training"
        )
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(f"S2-Attn does not implement {name}={kwargs[name]!r} attention")
    window = kwargs.get("sliding_window")
    if window is not None and g > window:
        raise ValueError(
            f"S2 group G={g} (N={n} × group_size_ratio={holder.group_size_ratio}) is wider "
            f"than the model's sliding window {window}: tokens would attend past the window. "
            f"Use group_size_ratio <= {window / n:.4g}"
        )
    valid = _padding(attention_mask, batch, n)  # (B, N) or None
    out4 = s2_attention(query, key, value, g, attention_mask=valid, scale=scaling)  # (B, H, N, D)
    return out4.transpose(1, 2).contiguous(), None  # (B, N, H, D)


def s2_attention_mask(*args: Any, **kwargs: Any) -> Any:
    """The ``"peftkit_s2"`` mask: exactly the mask the recorded implementation would get."""
    entry = _entry(kwargs.get("config"))
    if entry.original is None or entry.original not in ALL_MASK_ATTENTION_FUNCTIONS:
        return None  # as transformers does for an implementation without a mask function
    return ALL_MASK_ATTENTION_FUNCTIONS[entry.original](*args, **kwargs)


def register() -> None:
    """Register ``"peftkit_s2"`` with transformers (idempotent)."""
    AttentionInterface.register(NAME, s2_attention_forward)
    AttentionMaskInterface.register(NAME, s2_attention_mask)


# -- switching a model's attention ------------------------------------------------------------


def _uses_rope(module: nn.Module) -> bool:
    return any(isinstance(getattr(m, "inv_freq", None), Tensor) for m in module.modules())


def hf_roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost transformers models inside ``model`` (``model`` itself for a HF model)."""
    roots: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if any(r == "" or name.startswith(r + ".") for r, _ in roots):
            continue
        if callable(getattr(m, "set_attn_implementation", None)) and hasattr(m, "config"):
            roots.append((name, m))
    return roots


def _configs(model: nn.Module) -> Iterator[Any]:
    seen: set[int] = set()
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        c = stack.pop()
        if c is None or id(c) in seen or not hasattr(c, "_attn_implementation"):
            continue
        seen.add(id(c))
        yield c
        stack.extend(getattr(c, k, None) for k in getattr(c, "sub_configs", {}) or {})


def _impl_tree(config: Any) -> str | dict[str, Any] | None:
    """The implementation of ``config`` and its sub-configs, as ``set_attn_implementation``
    takes it back."""
    subs = {k: getattr(config, k, None) for k in getattr(config, "sub_configs", {}) or {}}
    subs = {k: c for k, c in subs.items() if c is not None}
    own: str | None = config._attn_implementation
    if not subs:
        return own
    return {"": own, **{k: _impl_tree(c) for k, c in subs.items()}}


@dataclass
class AttentionRecord:
    path: str
    implementation: str | dict[str, Any] | None
    config_ids: list[int]


def switch_attention(model: nn.Module, holder: nn.Module) -> list[AttentionRecord]:
    """Set ``"peftkit_s2"`` on every RoPE transformers model inside ``model``; the records
    restore the original implementations (:func:`restore_attention`)."""
    register()
    for dead in [k for k, e in _ENTRIES.items() if e.config() is None]:
        del _ENTRIES[dead]  # models dropped without unload
    records: list[AttentionRecord] = []
    try:
        for path, hf in hf_roots(model):
            if not _uses_rope(hf):
                continue
            config: Any = hf.config
            heads = getattr(config, "num_attention_heads", None)
            if isinstance(heads, int) and heads % 2:
                raise ValueError(
                    f"S2-Attn splits the heads in two halves, but {type(hf).__name__} has "
                    f"{heads}; use group_size_ratio=None (full attention) for this model"
                )
            tree = _impl_tree(config)
            configs = list(_configs(hf))
            for c in configs:
                _ENTRIES[id(c)] = _Entry(
                    weakref.ref(c), c._attn_implementation, weakref.ref(holder), weakref.ref(hf)
                )
            records.append(AttentionRecord(path, tree, [id(c) for c in configs]))
            hf.set_attn_implementation(NAME)  # type: ignore[operator]
            if config._attn_implementation != NAME:
                raise ValueError(
                    f"{type(hf).__name__} does not route attention through transformers' "
                    "AttentionInterface, so S2-Attn cannot apply; use group_size_ratio=None "
                    "(LoRA + trainable modules + position interpolation, full attention)"
                )
    except BaseException:
        restore_attention(model, records)
        raise
    return records


def restore_attention(model: nn.Module, records: list[AttentionRecord]) -> None:
    for rec in records:
        hf = model.get_submodule(rec.path)
        config: Any = hf.config
        if config._attn_implementation != rec.implementation:
            hf.set_attn_implementation(rec.implementation)  # type: ignore[operator]
        for i in rec.config_ids:
            _ENTRIES.pop(i, None)


# -- position interpolation -------------------------------------------------------------------


class RopeSwitch(Switchable):
    """A rotary embedding with interpolated positions beside the original one;
    ``disable_adapters`` routes back to the original."""

    def __init__(self, original: nn.Module, scaled: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.scaled = scaled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.original if self.disabled else self.scaled)(*args, **kwargs)


def scaled_rope_parameters(params: Any, factor: float) -> dict[str, Any]:
    """Linear position interpolation on top of ``params``: positions divided by ``factor``
    more (θ_j · m / (s₀ · factor)); only plain or already-linear RoPE composes this way."""
    if not isinstance(params, dict) or not params:
        raise ValueError(f"context_factor needs RoPE parameters on the config, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            "context_factor does not support per-layer-type RoPE parameters "
            f"({sorted(params)}); set context_factor=None and scale the config yourself"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(
            f"context_factor applies linear position interpolation, which composes only with "
            f"default or linear RoPE; this model uses rope_type={rope_type!r}. Set "
            "context_factor=None and extend the context through its own scaling"
        )
    old = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    new = {k: v for k, v in params.items() if k != "type"}
    new["rope_type"] = "linear"
    new["factor"] = old * float(factor)
    return new


def _rotaries(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(getattr(m, "inv_freq", None), Tensor) and hasattr(m, "config")
    ]


def check_positions(model: nn.Module, factor: float) -> None:
    """Raise (changing nothing) where :func:`extend_positions` cannot apply ``factor``."""
    rot = _rotaries(model)
    if not rot:
        raise ValueError(
            f"context_factor={factor} needs a RoPE model, but {type(model).__name__} has no "
            "rotary embedding (a module with inv_freq and a config); set context_factor=None"
        )
    for _, m in rot:
        scaled_rope_parameters(getattr(m.config, "rope_parameters", None), factor)


@dataclass
class RopeRecord:
    config: Any
    rope_parameters: dict[str, Any]


def extend_positions(model: nn.Module, factor: float) -> list[RopeRecord]:
    """Scale every rotary embedding's config by ``factor`` and rebuild the rotary modules."""
    check_positions(model, factor)
    rot = _rotaries(model)
    records: dict[int, RopeRecord] = {}
    for _, m in rot:
        cfg: Any = m.config
        if id(cfg) not in records:
            records[id(cfg)] = RopeRecord(cfg, copy.deepcopy(cfg.rope_parameters))
            cfg.rope_parameters = scaled_rope_parameters(cfg.rope_parameters, factor)
            cfg.validate_rope()
    for name, m in rot:
        old = m.inv_freq
        assert isinstance(old, Tensor)
        with torch.device(old.device):
            scaled = type(m)(m.config)
        scaled.to(dtype=old.dtype)
        _set_module(model, name, RopeSwitch(m, scaled))
    return list(records.values())


def restore_positions(model: nn.Module, records: list[RopeRecord], *, merged: bool) -> None:
    """Unwrap every :class:`RopeSwitch`: keep the scaled rotary (a merged model) or put the
    original rotary and RoPE parameters back."""
    for name, m in list(model.named_modules()):
        if isinstance(m, RopeSwitch):
            _set_module(model, name, m.scaled if merged else m.original)
    if not merged:
        for rec in records:
            rec.config.rope_parameters = rec.rope_parameters


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


__all__ = [
    "NAME",
    "RopeSwitch",
    "check_positions",
    "extend_positions",
    "group_size",
    "hf_roots",
    "register",
    "restore_attention",
    "restore_positions",
    "s2_attention_forward",
    "s2_attention_mask",
    "switch_attention",
]
