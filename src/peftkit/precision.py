"""Adapter precision on half-precision bases.

An adapter on an fp16/bf16 model is kept in fp32 by default (``autocast_adapter_dtype=True`` on
every config, as PEFT's ``get_peft_model(..., autocast_adapter_dtype=True)``): optimizer updates
of a small adapter are far below bf16's resolution (8 bits of mantissa), so bf16 adapters mostly
do not move, and fp16 ones overflow to NaN under AdamW at ordinary learning rates. Only the
adapter's own tensors are cast, never the base's.

The layer's *output* stays in the activation dtype: each method computes its branch in the
adapter's dtype (the input is cast up, as PEFT does) and casts the branch back before adding it
to the base output, so the rest of the model keeps running in fp16/bf16. The fused paths (LoRA's
merged GEMM, DoRA's folded scale) need one dtype for x, W and the factors and step aside.
Files keep the adapter's dtype: fp32, as PEFT writes them under the same default.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

HALF = (torch.float16, torch.bfloat16)

M = TypeVar("M", bound=nn.Module)


def wants_fp32(config: Any) -> bool:
    """Whether ``config`` asks for fp32 adapters on half-precision bases (the default)."""
    return bool(getattr(config, "autocast_adapter_dtype", True))


def adapter_dtype(dtype: torch.dtype, config: Any) -> torch.dtype:
    """The dtype an adapter gets on a base of ``dtype``: fp32 for fp16/bf16 unless the config
    keeps the base's dtype."""
    return torch.float32 if dtype in HALF and wants_fp32(config) else dtype


@torch.no_grad()
def upcast_adapter(layer: M, config: Any) -> M:
    """Cast ``layer``'s own half-precision parameters and buffers to fp32 (``layer.base`` and
    any other submodule are left alone); a no-op when ``config.autocast_adapter_dtype`` is False.
    Returns ``layer``."""
    if not wants_fp32(config):
        return layer
    for name, p in list(layer.named_parameters(recurse=False)):
        if p.dtype in HALF:
            new = nn.Parameter(p.to(torch.float32), requires_grad=p.requires_grad)
            setattr(layer, name, new)
    for name, b in list(layer.named_buffers(recurse=False)):
        if b.dtype in HALF:
            layer._buffers[name] = b.to(torch.float32)
    return layer


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_cast_floating(v, dtype) for v in value)
    return value


@torch.no_grad()
def upcast_modules_to_save(model: nn.Module, config: Any) -> None:
    """Give every half-precision ``modules_to_save`` copy (a classifier head, LongLoRA's embeddings
    and norms) fp32 parameters, so that it trains as the adapters do; its inputs are cast to fp32
    and its outputs back to the original module's dtype by two hooks on the copy, so the model
    around it keeps its dtype. The frozen original is untouched."""
    from .core import ModulesToSave

    if not wants_fp32(config):
        return
    copies = [c for m in model.modules() if isinstance(m, ModulesToSave) for c in m.copies.values()]
    for copy in copies:
        if getattr(copy, "_peftkit_upcast", False):
            continue
        dtypes = {p.dtype for p in copy.parameters() if p.is_floating_point()}
        if len(dtypes) != 1 or (half := next(iter(dtypes))) not in HALF:
            continue
        for p in copy.parameters():
            p.data = p.data.to(torch.float32)
        # Note: hooks on peftkit's own copy, not on a user module; a (B, T, d) input becomes fp32
        # for the copy alone, and only tensor outputs (and plain tuples of them) are cast back.
        copy.register_forward_pre_hook(
            lambda _m, args, kwargs: (_cast_floating(args, torch.float32), kwargs),
            with_kwargs=True,
        )
        copy.register_forward_hook(lambda _m, _args, out, dt=half: _cast_floating(out, dt))
        copy._peftkit_upcast = True

__all__ = ["adapter_dtype", "upcast_adapter", "upcast_modules_to_save", "wants_fp32"]
