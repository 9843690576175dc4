"""NF4Linear: a frozen linear layer whose weight is stored in NF4 (QLoRA's base storage).

``y = x W^T + b`` with ``W = dequant(W_nf4)`` materialised on the fly in ``compute_dtype``
(QLoRA, https://arxiv.org/abs/2305.14314, section 3). The autograd function saves only the packed
codes and scales; backward re-dequantizes to get ``dx = dy W``. ``W`` never receives a gradient.

Buffers (all in ``state_dict``): ``weight`` (uint8 packed codes, bitsandbytes' layout),
``weight_absmax``, and with double quantization ``weight_nested_absmax`` and ``weight_offset``.
A fresh ``NF4Linear`` built with the same arguments loads that state dict strictly. A
bitsandbytes/transformers 4-bit checkpoint uses other keys (``weight.absmax``, ...): see
``bnb_format.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nf4 import (
    NF4Tensor,
    check_blocksize,
    nf4_dequantize,
    nf4_quantize,
)

__all__ = ["NF4Linear", "quantize_"]

_Meta = tuple[torch.Size, torch.dtype, int, torch.dtype]  # shape, weight dtype, blocksize, compute


class _NF4Matmul(torch.autograd.Function):
    """``y = x W^T + b`` saving only the NF4 weight; ``dx = dy W``, ``db = sum(dy)``, no ``dW``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        bias: Tensor | None,
        packed: Tensor,
        absmax: Tensor,
        nested_absmax: Tensor | None,
        offset: Tensor | None,
        meta: _Meta,
    ) -> Tensor:
        compute_dtype = meta[3]
        w = _dense(packed, absmax, nested_absmax, offset, meta)  # (out, in)
        b = None if bias is None else bias.to(compute_dtype)
        y = F.linear(x.to(compute_dtype), w, b)  # (..., out)
        ctx.save_for_backward(packed, absmax, nested_absmax, offset)
        ctx.meta = meta
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        packed, absmax, nested_absmax, offset = ctx.saved_tensors
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            w = _dense(packed, absmax, nested_absmax, offset, ctx.meta)  # (out, in)
            grad_x = (grad_y.to(w.dtype) @ w).to(ctx.x_dtype)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)  # (out,)
        return grad_x, grad_b, None, None, None, None, None


def _dense(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    offset: Tensor | None,
    meta: _Meta,
) -> Tensor:
    shape, weight_dtype, blocksize, compute_dtype = meta
    q = NF4Tensor(packed, absmax, shape, weight_dtype, blocksize, nested_absmax, offset)
    # Note: dequantize to the original dtype first, then cast, as bitsandbytes does: a bf16
    # checkpoint computed in fp32 then sees exactly the weights bitsandbytes would use.
    return nf4_dequantize(q).to(compute_dtype)


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` replacement holding its weight in NF4 (optionally double-quantized).

    Args:
        in_features: as ``nn.Linear``.
        out_features: as ``nn.Linear``.
        bias: as ``nn.Linear``; the bias stays dense and frozen.
        blocksize: NF4 block size ``B`` (QLoRA: 64).
        double_quant: whether the block scales are themselves 8-bit quantized (QLoRA: True).
        weight_dtype: the dtype of the weight that was quantized; ``dequantize`` reproduces it
            before casting to ``compute_dtype``.
        compute_dtype: dtype of the matmul (default ``weight_dtype``). Inputs are cast to it and
            outputs back to the input dtype. ``module.to(dtype)`` does not change it.

    The constructor makes empty (all-zero) storage of the right shapes: use ``from_linear``,
    ``quantize_`` or ``load_state_dict`` to fill it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        weight_dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"NF4Linear needs positive sizes, got in_features={in_features}, "
                f"out_features={out_features}"
            )
        check_blocksize(blocksize)
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.weight_dtype = weight_dtype
        self.compute_dtype = weight_dtype if compute_dtype is None else compute_dtype
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        kw: dict[str, Any] = {"device": device}
        self.weight: Tensor
        self.weight_absmax: Tensor
        self.weight_nested_absmax: Tensor | None
        self.weight_offset: Tensor | None
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, **kw))
        if double_quant:
            self.register_buffer("weight_absmax", torch.zeros(n_blocks, dtype=torch.uint8, **kw))
            n_super = -(-n_blocks // 256)
            self.register_buffer("weight_nested_absmax", torch.zeros(n_super, **kw))
            self.register_buffer("weight_offset", torch.zeros((), **kw))
        else:
            self.register_buffer("weight_absmax", torch.zeros(n_blocks, **kw))
            self.register_buffer("weight_nested_absmax", None)
            self.register_buffer("weight_offset", None)
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=weight_dtype, **kw), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        """Quantize ``linear.weight`` (fp32/bf16/fp16) into a new NF4Linear on the same device."""
        w = linear.weight
        if w.device.type == "meta":
            raise ValueError(
                "NF4Linear.from_linear: the weight is on the meta device; load it first"
            )
        q = nf4_quantize(w, blocksize, double_quant)
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            blocksize=blocksize,
            double_quant=double_quant,
            weight_dtype=w.dtype,
            compute_dtype=compute_dtype,
            device=w.device,
        )
        layer._set_nf4(q)
        if linear.bias is not None and layer.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer.train(linear.training)

    def _set_nf4(self, q: NF4Tensor) -> None:
        self.weight = q.packed
        self.weight_absmax = q.absmax
        self.weight_nested_absmax = q.nested_absmax
        self.weight_offset = q.offset

    @property
    def nf4(self) -> NF4Tensor:
        """The stored weight as an ``NF4Tensor`` (views of the buffers, no copy)."""
        return NF4Tensor(
            self.weight,
            self.weight_absmax,
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
            self.blocksize,
            self.weight_nested_absmax,
            self.weight_offset,
        )

    def _meta(self) -> _Meta:
        shape = torch.Size((self.out_features, self.in_features))
        return (shape, self.weight_dtype, self.blocksize, self.compute_dtype)

    def dequantize(self) -> Tensor:
        """The dense weight ``(out_features, in_features)`` in ``compute_dtype``."""
        with torch.no_grad():
            return _dense(
                self.weight,
                self.weight_absmax,
                self.weight_nested_absmax,
                self.weight_offset,
                self._meta(),
            )

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = _NF4Matmul.apply(  # type: ignore[no-untyped-call]
            x,
            self.bias,
            self.weight,
            self.weight_absmax,
            self.weight_nested_absmax,
            self.weight_offset,
            self._meta(),
        )
        return y

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> NF4Linear:
        # Note: ``model.half()`` / ``model.to(torch.bfloat16)`` cast every floating buffer, which
        # would round the fp32 scales and silently change the weight. Viewing them as int32 for
        # the duration lets device moves through and keeps the bits.
        pinned = [k for k, b in self._buffers.items() if b is not None and b.dtype == torch.float32]
        for name in pinned:
            self._buffers[name] = self._buffers[name].view(torch.int32)  # type: ignore[union-attr]
        try:
            super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        finally:
            for name in pinned:
                self._buffers[name] = self._buffers[name].view(torch.float32)  # type: ignore[union-attr]
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, weight_dtype={self.weight_dtype}, "
            f"compute_dtype={self.compute_dtype}"
        )


def _is_output_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    if name == "lm_head" or name.endswith(".lm_head"):
        return True
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
        if head is module:
            return True
    return False


def _embedding_weights(model: nn.Module) -> tuple[dict[int, str], dict[int, str]]:
    """Embedding weights by object id and by storage address (ties may share only storage)."""
    by_id: dict[int, str] = {}
    by_ptr: dict[int, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            by_id[id(mod.weight)] = name
            if mod.weight.device.type != "meta":
                by_ptr[mod.weight.data_ptr()] = name
    return by_id, by_ptr


def _tied_embedding(
    embeddings: tuple[dict[int, str], dict[int, str]], linear: nn.Linear
) -> str | None:
    by_id, by_ptr = embeddings
    w: Tensor = linear.weight
    if id(w) in by_id:
        return by_id[id(w)]
    return None if w.device.type == "meta" else by_ptr.get(w.data_ptr())


def _matches(name: str, suffixes: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def quantize_(
    model: nn.Module,
    target_modules: Sequence[str] | None = None,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    *,
    exclude_modules: Sequence[str] = (),
) -> nn.Module:
    """Replace ``nn.Linear`` layers of ``model`` by ``NF4Linear`` in place and return ``model``.

    By default every ``nn.Linear`` (exact type) except the output head: a module named ``lm_head``,
    the model's ``get_output_embeddings()``, or a linear whose weight is tied to an
    ``nn.Embedding``. ``target_modules`` is a list of module-name suffixes matched on whole path
    components (``"q_proj"`` matches ``"layers.0.self_attn.q_proj"``); named modules are quantized
    even if they are the head, but tied weights and non-``nn.Linear`` modules are errors.
    ``exclude_modules`` (suffixes, same matching) are left dense in either mode, e.g. a
    classifier trained in full. Modules a transformers model keeps in fp32
    (``_keep_in_fp32_modules``, ``_keep_in_fp32_modules_strict``: T5's ``wo``, whose weight dtype
    T5 casts its input to) are left dense by default, as transformers' 4-bit loading does, and
    an error as targets. ``compute_dtype`` defaults to each layer's weight dtype. Nothing else is
    frozen or changed.
    """
    for arg, value in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if isinstance(value, str):
            raise TypeError(
                f"{arg} must be a list of module-name suffixes, got the string {value!r}; "
                f"write [{value!r}]"
            )
    check_blocksize(blocksize)
    embeddings = _embedding_weights(model)
    keep = [
        k
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict")
        for k in (getattr(model, attr, None) or ())
        if isinstance(k, str)
    ]
    chosen: list[tuple[str, nn.Linear]] = []
    matched: set[str] = set()
    for name, mod in model.named_modules():
        if not name:
            continue
        if target_modules is not None:  # an excluded match still counts as matched
            matched.update(s for s in target_modules if _matches(name, (s,)))
        if _matches(name, exclude_modules):
            continue
        kept = _matches(name, keep) or _matches(name + ".weight", keep)
        if target_modules is None:
            if type(mod) is not nn.Linear or _is_output_head(model, name, mod) or kept:
                continue
            if _tied_embedding(embeddings, mod) is not None:
                continue
        else:
            if not _matches(name, target_modules):
                continue
            if type(mod) is not nn.Linear:
                raise TypeError(
                    f"quantize_: target {name!r} is a {type(mod).__name__}; only nn.Linear "
                    "layers can be quantized to NF4 (subclasses may change forward)"
                )
            if kept:
                raise ValueError(
                    f"quantize_: {type(model).__name__} keeps {name!r} in fp32 "
                    "(_keep_in_fp32_modules: the model reads that weight's dtype itself, and an "
                    "NF4 weight would break its forward); leave it out of target_modules"
                )
            tied = _tied_embedding(embeddings, mod)
            if tied is not None:
                raise ValueError(
                    f"quantize_: {name!r} shares its weight with the embedding {tied!r}; "
                    "quantizing it would untie them. Leave it out of target_modules"
                )
        chosen.append((name, mod))
    if target_modules is not None and set(target_modules) - matched:
        missing = sorted(set(target_modules) - matched)
        raise ValueError(f"quantize_: target_modules {missing} matched no module of the model")
    if not chosen:
        raise ValueError("quantize_: the model has no nn.Linear layer to quantize")
    done: dict[int, NF4Linear] = {}  # a module registered under two names is quantized once
    for name, mod in chosen:
        if id(mod) not in done:
            done[id(mod)] = NF4Linear.from_linear(
                mod, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, done[id(mod)])
    return model
