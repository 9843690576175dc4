"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, https://arxiv.org/abs/2402.09353).

Each adapted weight is split into one magnitude per output unit and a direction learnt by LoRA:

    V  = W + s·B A                          (out, in),  s = α/r (rsLoRA: α/√r)
    n  = ‖V‖_row ∈ R^out                    L2 norm of each output unit's row, over the input
    W' = diag(m / n) · V,    y = x W'ᵀ + b,  m ∈ R^out trainable, initialised to n (a no-op)

``n`` is treated as a constant in backward (paper §4.3, as PEFT does): its value follows A and B
every step, but no gradient flows through it. Selected by ``LoraConfig(use_dora=True)``; files
are PEFT's (``peft_type: "LORA"``, ``use_dora: true``, key ``lora_magnitude_vector``, no
``.weight``).

**Never materialising BA in training.** With ``g = m / n`` the output is
``y = g ⊙ (base(x) − b + s·(x Aᵀ) Bᵀ) + b``, and the norms come in factored form, O(out·r) memory:

    n² = ‖W‖²_row  +  2s · rowsum((W Aᵀ) ⊙ B)  +  s² · rowsum((B (A Aᵀ)) ⊙ B)

with ‖W‖²_row cached (W is frozen; the cache follows the base tensors' identity and version).
For a frozen dense base and enough tokens, g rides on the weights instead of the output:
``y = x (g⊙W)ᵀ + h (s·g⊙B)ᵀ + b``, which forms a transient g⊙W (a row scaling of W, no BA in
it) in each direction instead of (T, out) temporaries.

**Saved activations.** A custom autograd function saves the input x (which LoRA's ∂A needs
anyway) and the layer's output ``y``, the very tensor returned: ``∂L/∂m = Σ_tokens ∂L/∂y ⊙
(y − b) / m`` (= ``Σ ∂L/∂y ⊙ z / n``, z = V x). So DoRA saves LoRA's activations plus one
output-sized tensor per layer; the general path recomputes the rank-r ``h = x Aᵀ`` in backward
instead of saving it, the folded path keeps it (T·r floats) to spare a GEMM over x. Where the
next op saves y anyway (Llama's gate_proj → SiLU, up_proj → the MLP product, v_proj →
attention without a KV cache) it shares that storage and costs nothing. Rows with m = 0
recompute their z. No BA, and no (out, in) tensor other than the row scaling g⊙W, is formed in
forward or backward.

**Dropout** (train mode, p > 0) follows PEFT and the official code: the dropped input feeds the
magnitude correction and the LoRA term, the base keeps the clean input,
``y = base(x) + (g − 1) ⊙ D(x) Wᵀ + g ⊙ s·(D(x) Aᵀ) Bᵀ``; this path saves D(x) and
z = D(x)Wᵀ + s·D(x)AᵀBᵀ (y is not z there).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core import CONV1D, EMBEDDING, LINEAR, NF4, dense_weight
from ..precision import upcast_adapter
from .lora import LoraConfig, LoraLayer, layer_kwargs
from .registry import LayerSpec, Method


def _compute_dtype(t: Tensor) -> torch.dtype:
    # Note: norms are computed in fp32 (fp64 for fp64 weights), never in bf16/fp16.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def row_norms(
    w: Tensor, a: Tensor, b: Tensor, scaling: float, w_sq: Tensor | None = None
) -> Tensor:
    """``‖W + s·BA‖`` per row without forming BA: ``w`` (out, in), ``a`` (r, in), ``b`` (out, r);
    ``w_sq`` = ``‖W‖²_row`` if known. Extra memory O(out·r + r²)."""
    c = _compute_dtype(w)
    if w_sq is None:
        w_sq = w.to(c).square().sum(1)  # (out,)
    wa = torch.mm(w, a.t().to(w.dtype)).to(c)  # (out, in) @ (in, r) -> (out, r)
    b_, a_ = b.to(c), a.to(c)
    gram = a_ @ a_.t()  # (r, in) @ (in, r) -> (r, r)
    # Note: 2s⟨W_j, (BA)_j⟩ + s²‖(BA)_j‖² = ⟨2s·(W Aᵀ)_j + s²·(B AAᵀ)_j, B_j⟩: one GEMM, one dot.
    t = torch.addmm(wa, b_, gram, beta=2 * scaling, alpha=scaling * scaling)  # (out, r)
    n_sq: Tensor = torch.linalg.vecdot(t, b_).add_(w_sq)  # (out,)
    return n_sq.clamp_min_(0).sqrt_()


def _safe(norm: Tensor) -> Tensor:
    # Note: a dead row (W + sBA = 0, so m = 0 at init) gives 0/0 in PEFT; here g = 0 there.
    return norm.clamp_min(torch.finfo(norm.dtype).tiny)


def _magnitude_grad(
    num: Tensor, m: Tensor, norm: Tensor, dy: Tensor, dead_z: Callable[[Tensor], Tensor]
) -> Tensor:
    """``∂L/∂m = num / m`` with ``num = Σ_T ∂L/∂y ⊙ g z`` (fp32/fp64). Where m = 0, y holds no
    z: those rows get ``Σ_T ∂L/∂y ⊙ z / n`` with their z recomputed by ``dead_z(idx)`` (T, k).
    One synchronising check (``m.all()``) decides."""
    c = norm.dtype
    if bool(m.all()):
        return (num / m.to(c)).to(m.dtype)
    dead = m == 0
    d_m = num / torch.where(dead, torch.ones_like(m), m).to(c)
    idx = dead.nonzero().squeeze(1)
    d_m[idx] = (dy[:, idx] * dead_z(idx)).sum(0, dtype=c) / norm[idx]
    return d_m.to(m.dtype)


def _lora_grads(
    gy: Tensor,
    x: Tensor,
    a: Tensor | None,
    h: Tensor | None,
    lora_b: Tensor,
    s: float,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The LoRA part of backward from ``gy = g ⊙ ∂L/∂y`` (T, out): ``(∂x, ∂A, ∂h, ∂B, h)``, with
    ``needs`` = whether x, A, h, B need a gradient. ``h = x Aᵀ`` is recomputed from the saved x
    (a (T, in) @ (in, r) GEMM) when ``a`` is given, else it is the saved h (an embedding)."""
    n_x, n_a, n_h, n_b = needs
    dt, r = gy.dtype, lora_b.shape[1]
    if a is not None:
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        h2 = torch.mm(x2, a.t()).to(dt) if n_b else None  # (T, in) @ (in, r) -> (T, r)
    else:
        assert h is not None
        h2 = h.reshape(-1, r).to(dt)
    d_x = d_a = d_h = d_b = None
    if n_x or n_a or n_h:
        ds = torch.mm(gy, lora_b.to(dt)).mul_(s)  # ∂L/∂h, (T, out) @ (out, r) -> (T, r)
        if a is not None:
            ds = ds.to(a.dtype)
            d_x = torch.mm(ds, a).view(x.shape) if n_x else None  # (T, r) @ (r, in)
            d_a = torch.mm(ds.t(), x2) if n_a else None  # (r, T) @ (T, in)
        elif n_h:
            assert h is not None
            d_h = ds.to(h.dtype).view(h.shape)
    if n_b:
        assert h2 is not None
        d_b = torch.mm(gy.t(), h2).mul_(s).to(lora_b.dtype)  # (out, T) @ (T, r)
    return d_x, d_a, d_h, d_b, h2


class _DoraFn(torch.autograd.Function):
    """``y = g ⊙ (out + s·h Bᵀ) + (1 − g) ⊙ b`` with ``out = x Wᵀ + b`` (the base's output,
    computed outside), ``h = x Aᵀ``, ``g = m / n`` (n constant).

    Saves x (which the LoRA branch needs anyway) and y, the very tensor returned (so an op after
    the layer that saves its input shares it); h is recomputed in backward, not saved. For an
    embedding, pass ``a=None`` and the gathered ``h`` (differentiable): h is then saved."""

    @staticmethod
    def forward(
        ctx: Any,
        out: Tensor,
        x: Tensor,
        a: Tensor | None,
        h: Tensor | None,
        lora_b: Tensor,
        m: Tensor,
        norm: Tensor,
        bias: Tensor | None,
        scaling: float,
        rows: Any,
    ) -> Tensor:
        dt, o = out.dtype, out.shape[-1]
        if a is not None:
            h = F.linear(x, a)  # (..., in) @ (in, r) -> (..., r); not saved
        assert h is not None
        g = (m.to(norm.dtype) / norm).to(dt)  # (out,)
        y = torch.addmm(
            out.reshape(-1, o), h.reshape(-1, h.shape[-1]).to(dt), lora_b.t().to(dt), alpha=scaling
        )  # (T, out) + (T, r) @ (r, out)
        y.mul_(g)
        if bias is not None:
            y.add_(bias.to(dt) * (1 - g))
        y = y.view(out.shape)
        ctx.save_for_backward(x, a, None if a is not None else h, lora_b, m, norm, bias, y)
        ctx.scaling, ctx.rows = scaling, rows
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, a, h, lora_b, m, norm, bias, y = ctx.saved_tensors
        s, (n_out, n_x, n_a, n_h, n_b, n_m) = ctx.scaling, ctx.needs_input_grad[:6]
        o, dt = y.shape[-1], y.dtype
        dy2 = dy.reshape(-1, o)  # (T, out)
        g = (m.to(norm.dtype) / norm).to(dt)
        gy = dy2 * g  # ∂L/∂out, (T, out)
        d_x, d_a, d_h, d_b, h2 = _lora_grads(gy, x, a, h, lora_b, s, (n_x, n_a, n_h, n_b))
        d_m = None
        if n_m:
            y2 = y.reshape(-1, o)
            yz = y2 - bias.to(dt) if bias is not None else y2  # = g ⊙ z
            num = (dy2 * yz).sum(0, dtype=norm.dtype)  # Σ_T ∂L/∂y ⊙ g z, (out,)

            def dead_z(idx: Tensor) -> Tensor:
                hh = h2 if h2 is not None else torch.mm(x.reshape(-1, x.shape[-1]), a.t()).to(dt)
                z: Tensor = ctx.rows(x, idx).to(dt) + torch.mm(hh, lora_b[idx].t().to(dt)) * s
                return z  # (T, k)

            d_m = _magnitude_grad(num, m, norm, dy2, dead_z)
        d_out = gy.view(dy.shape) if n_out else None
        d_bias = None
        if ctx.needs_input_grad[7]:  # a trained bias: its (1 − g)⊙b term; base(x) carries g⊙b
            assert bias is not None
            d_bias = (dy2.sum(0) * (1 - g)).to(bias.dtype)
        return d_out, d_x, d_a, d_h, d_b, d_m, None, d_bias, None, None


class _DoraLinearFn(torch.autograd.Function):
    """A frozen dense base without dropout: ``y = x (g⊙W)ᵀ + b + h (s·g⊙B)ᵀ``, ``h = x Aᵀ``.

    The per-unit scale ``g = m / n`` rides on W and B (out·in and out·r multiplies) instead of on
    the (T, out) output and its gradient, so neither direction forms a (T, out) temporary:
    backward is ``∂x = ∂y (g⊙W) + (s·∂y (g⊙B)) A``, ``∂A = (s·∂y (g⊙B))ᵀ x``, ``∂B = s·g ⊙ ∂yᵀh``
    and ``∂m = Σ_T ∂y ⊙ (y − b) / m``. ``g⊙W`` is a transient the size of W, formed once in each
    direction (as an NF4 base's dequantised weight is); BA never is. Saves x, h (T, r) and y,
    the very tensor returned. Measured on W1: 2 % faster than :class:`_DoraFn`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w: Tensor,
        bias: Tensor | None,
        a: Tensor,
        lora_b: Tensor,
        m: Tensor,
        norm: Tensor,
        scaling: float,
        rows: Any,
    ) -> Tensor:
        g = (m.to(norm.dtype) / norm).to(w.dtype)  # (out,)
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        h = torch.mm(x2, a.t())  # (T, in) @ (in, r) -> (T, r)
        y = F.linear(x2, w * g[:, None], bias)  # (T, in) @ (in, out) -> (T, out)
        y.addmm_(h, (lora_b * (g * scaling)[:, None]).t())  # += (T, r) @ (r, out)
        y = y.view(*x.shape[:-1], y.shape[-1])
        ctx.save_for_backward(x, w, bias, h, a, lora_b, m, norm, y)
        ctx.scaling, ctx.rows = scaling, rows
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, w, bias, h, a, lora_b, m, norm, y = ctx.saved_tensors
        n_x, _, n_bias, n_a, n_b, n_m = ctx.needs_input_grad[:6]
        s, dt = ctx.scaling, y.dtype
        g = (m.to(norm.dtype) / norm).to(dt)  # (out,)
        dy2, x2 = dy.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])  # (T, out), (T, in)
        d_x = d_bias = d_a = d_b = d_m = None
        gs = g * s  # (out,)
        if n_x or n_a:
            ds = torch.mm(dy2, lora_b * gs[:, None])  # ∂L/∂h, (T, out) @ (out, r)
            if n_a:
                d_a = torch.mm(ds.t(), x2)  # (r, T) @ (T, in)
            if n_x:
                d_x = torch.mm(dy2, w * g[:, None])  # (T, out) @ (out, in)
                d_x = d_x.addmm_(ds, a).view(x.shape)  # += (T, r) @ (r, in)
        if n_b:
            d_b = torch.mm(dy2.t(), h).mul_(gs[:, None])  # (out, T) @ (T, r)
        if n_bias or (n_m and bias is not None):
            d_bias = dy2.sum(0)  # (out,)
        if n_m:
            y2 = y.reshape(-1, y.shape[-1])
            c = norm.dtype
            num = (dy2 * y2).sum(0, dtype=c)  # Σ_T ∂L/∂y ⊙ y, (out,)
            if bias is not None:
                assert d_bias is not None
                num = num - bias.to(c) * d_bias.to(c)  # y − b = g ⊙ z
            d_m = _magnitude_grad(
                num, m, norm, dy2, lambda i: ctx.rows(x, i).to(dt) + torch.mm(h, lora_b[i].t()) * s
            )
        return d_x, None, d_bias if n_bias else None, d_a, d_b, d_m, None, None, None


class _DoraDropoutFn(torch.autograd.Function):
    """Train-mode dropout: ``y = out + (g − 1) ⊙ out_d + g ⊙ s·h Bᵀ`` with ``out = base(x)``,
    ``out_d = D(x) Wᵀ`` and ``h = D(x) Aᵀ``. Saves D(x) (the LoRA branch needs it anyway) and
    ``z = out_d + s·h Bᵀ``; h is recomputed in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        out: Tensor,
        out_d: Tensor,
        xd: Tensor,
        a: Tensor,
        lora_b: Tensor,
        m: Tensor,
        norm: Tensor,
        scaling: float,
    ) -> Tensor:
        dt, o = out.dtype, out.shape[-1]
        g = (m.to(norm.dtype) / norm).to(dt)
        h = F.linear(xd, a)  # (..., in) @ (in, r) -> (..., r); not saved
        z = torch.addmm(
            out_d.reshape(-1, o).to(dt),
            h.reshape(-1, h.shape[-1]).to(dt),
            lora_b.t().to(dt),
            alpha=scaling,
        )  # (T, out) + (T, r) @ (r, out)
        y = (out.reshape(-1, o) - out_d.reshape(-1, o).to(dt)).addcmul_(z, g)  # (T, out)
        ctx.save_for_backward(xd, a, lora_b, m, norm, z)
        ctx.scaling = scaling
        return y.view(out.shape)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        xd, a, lora_b, m, norm, z = ctx.saved_tensors
        s, (n_out, n_od, n_x, n_a, n_b, n_m) = ctx.scaling, ctx.needs_input_grad[:6]
        o, dt = z.shape[-1], z.dtype
        dy2 = dy.reshape(-1, o)  # (T, out)
        g = (m.to(norm.dtype) / norm).to(dt)
        gy = dy2 * g
        d_x, d_a, _, d_b, _ = _lora_grads(gy, xd, a, None, lora_b, s, (n_x, n_a, False, n_b))
        d_m = ((dy2 * z).sum(0, dtype=norm.dtype) / norm).to(m.dtype) if n_m else None
        d_od = (gy - dy2).view(dy.shape) if n_od else None
        return dy if n_out else None, d_od, d_x, d_a, d_b, d_m, None, None


class DoraLayer(LoraLayer):
    """LoRA's A and B plus ``lora_magnitude_vector`` (out,): ``y = (m/‖W+sBA‖) ⊙ (W+sBA) x + b``."""

    roles: ClassVar[dict[str, str]] = {
        "lora_A": "A",
        "lora_B": "B",
        "lora_magnitude_vector": "magnitude",
    }

    #: Train through :class:`_DoraLinearFn` where it applies (set False to compare).
    fold_scale: ClassVar[bool] = True

    def __init__(self, base: nn.Module, **kw: Any) -> None:
        super().__init__(base, **kw)
        self._w_sq: Tensor | None = None
        self._w_key: tuple[Any, ...] | None = None
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(self.lora_A.dtype))

    # -- the norms ---------------------------------------------------------------------------------
    def _weight_key(self) -> tuple[Any, ...]:
        ts = itertools.chain(self.base.parameters(), self.base.buffers())
        return tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in ts)

    def _clear_cache(self) -> None:
        self._w_sq, self._w_key = None, None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DoraLayer:
        # Note: .to()/.half()/.cuda() may reuse an address with version 0; drop the cache outright.
        self._clear_cache()
        return super()._apply(fn, *args, **kwargs)  # type: ignore[no-untyped-call,no-any-return]

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """``‖W + s·BA‖`` per output unit (detached, fp32/fp64), in factored form; ‖W‖² cached."""
        w = dense_weight(self.base)  # (out, in); a view except for NF4 (dequantised)
        if torch.compiler.is_compiling():
            # Note: the cache key reads data pointers, which a compiled graph cannot compare;
            # ‖W‖² is one pass over W there, fused by the compiler.
            return row_norms(w, self.lora_A, self.lora_B, self.scaling)
        key = self._weight_key()
        if self._w_sq is None or key != self._w_key:
            self._w_sq = w.to(_compute_dtype(w)).square().sum(1)  # (out,)
            self._w_key = key
        return row_norms(w, self.lora_A, self.lora_B, self.scaling, self._w_sq)

    # -- forward ----------------------------------------------------------------------------------
    def _embed_a(self, x: Tensor) -> Tensor:
        """``h = A[:, x]ᵀ`` (..., r) for an embedding base, with the base's lookup options."""
        e = self.base
        assert isinstance(e, nn.Embedding)
        return F.embedding(
            x, self.lora_A.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse
        )  # (..., r)

    def _bias(self) -> Tensor | None:
        return None if self.kind == EMBEDDING else getattr(self.base, "bias", None)

    @torch.no_grad()
    def _base_rows(self, x: Tensor, idx: Tensor) -> Tensor:
        """Rows ``idx`` of ``x Wᵀ`` (no bias), flattened to (T, k): recomputes z where m = 0."""
        w = dense_weight(self.base)[idx]  # (k, in)
        if self.kind == EMBEDDING:
            return F.embedding(x, w.t()).reshape(-1, len(idx))  # (T, k)
        return F.linear(x.reshape(-1, x.shape[-1]).to(w.dtype), w)  # (T, in) @ (in, k)

    def _base_no_bias(self, x: Tensor) -> Tensor:
        if self.kind == NF4:
            out: Tensor = self.base(x)  # its own autograd: no dequantised weight is saved
            b = self._bias()
            return out if b is None else out - b
        return F.linear(x, dense_weight(self.base))  # (..., in) @ (in, out)

    def _fused_ok(self, x: Tensor) -> bool:
        """Whether :class:`_DoraLinearFn` applies: a frozen dense Linear/Conv1D nobody hooks,
        no train-mode dropout, one dtype, no autocast, and at least ⅔·``in`` tokens (g⊙W then
        costs fewer passes over memory than scaling the output, copying it and scaling ∂y)."""
        base = self.base
        # Note: a subclass of nn.Linear may compute something else; only the plain layers.
        if not (self.fold_scale and (type(base) is nn.Linear or self.kind == CONV1D)):
            return False
        tokens = x.numel() // max(x.shape[-1], 1)
        return (
            self._base_computable_here(x)
            and x.dtype == self.lora_A.dtype  # the folded path runs in one dtype
            and (not self.training or isinstance(self.dropout, nn.Identity))
            and 3 * tokens >= 2 * self.in_features
        )

    def _forward_reference(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The same maths as the autograd functions in plain differentiable ops (n a constant):
        what a compiled graph runs, since their backward branches on the data (rows with m = 0)
        and the compiler then picks what to save itself."""
        out: Tensor = self.base(x, *args, **kwargs)
        if self.disabled or self.merged:
            return out
        m, a, b, s = self.lora_magnitude_vector, self.lora_A, self.lora_B, self.scaling
        norm = _safe(self.weight_norm())  # (out,), no grad
        g = (m.to(norm.dtype) / norm).to(out.dtype)  # (out,)
        if self.kind == EMBEDDING:
            bias, xd, od = None, x, out
            h = self._embed_a(x)  # (..., r)
        else:
            bias = self._bias()
            dropping = self.training and not isinstance(self.dropout, nn.Identity)
            xd = self.dropout(x) if dropping else x
            od = self._base_no_bias(xd) if dropping else (out if bias is None else out - bias)
            h = F.linear(xd.to(a.dtype), a)  # (..., r)
        z = od + (F.linear(h, b) * s).to(out.dtype)  # D(x) Wᵀ + s·h Bᵀ, (..., out)
        return out - od + g * z  # = g ⊙ z + b without dropout

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if torch.compiler.is_compiling():
            return self._forward_reference(x, *args, **kwargs)
        m, a, b = self.lora_magnitude_vector, self.lora_A, self.lora_B
        if not (self.disabled or self.merged or args or kwargs) and self._fused_ok(x):
            y: Tensor = _DoraLinearFn.apply(  # type: ignore[no-untyped-call]
                x, dense_weight(self.base), self._bias(), a, b, m, _safe(self.weight_norm()),
                self.scaling, self._base_rows,
            )
            return y
        out: Tensor = self.base(x, *args, **kwargs)
        if self.disabled or self.merged:
            return out
        norm = _safe(self.weight_norm())
        if self.kind == EMBEDDING:
            # Note: the gathered h = A[:, x]ᵀ keeps its own autograd (padding_idx, ...); saved.
            y = _DoraFn.apply(  # type: ignore[no-untyped-call]
                out, x, None, self._embed_a(x), b, m, norm, None, self.scaling, self._base_rows
            )
            return y
        if not self.training or isinstance(self.dropout, nn.Identity):
            y = _DoraFn.apply(  # type: ignore[no-untyped-call]
                out, x.to(a.dtype), a, None, b, m, norm, self._bias(), self.scaling, self._base_rows
            )
            return y
        xd = self.dropout(x)
        y = _DoraDropoutFn.apply(  # type: ignore[no-untyped-call]
            out, self._base_no_bias(xd), xd.to(a.dtype), a, b, m, norm, self.scaling
        )
        return y

    def update(self, x: Tensor) -> Tensor:
        raise TypeError("DoRA is not an additive branch; call the layer itself")

    def row_scale(self) -> Tensor | None:
        """g = m / ‖W + sBA‖ (the norm detached, as in the paper)."""
        return self.lora_magnitude_vector / _safe(self.weight_norm()).to(
            self.lora_magnitude_vector.dtype
        )

    def add_to(self, x: Tensor, out: Tensor) -> Tensor:
        if self.disabled or self.merged:
            return out
        base = self.base(x)
        return out + (self(x) - base).to(out.dtype)

    # -- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _direction(self) -> tuple[Tensor, Tensor]:
        """``(V, g)``: V = W + s·BA dense (out, in) and g = m / ‖V‖_row, in fp32/fp64."""
        w = dense_weight(self.base)
        c = _compute_dtype(w)
        v = w.to(c) + self.scaling * (self.lora_B.to(c) @ self.lora_A.to(c))  # (out, r) @ (r, in)
        g = self.lora_magnitude_vector.to(c) / _safe(torch.linalg.vector_norm(v, dim=1))
        return v, g

    def merged_weight(self) -> Tensor:
        v, g = self._direction()
        return g[:, None] * v  # (out, in)

    def delta_weight(self) -> Tensor:
        w = dense_weight(self.base)
        return self.merged_weight() - w.to(_compute_dtype(w))

    @torch.no_grad()
    def _write(self, dense: Tensor) -> None:
        w = self.base.weight
        assert isinstance(w, Tensor)
        w.copy_((dense if self.kind == LINEAR else dense.t()).to(w.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """``W ← (m/‖W+sBA‖) ⊙ (W+sBA)``; keeps g (and any rows with g = 0) for :meth:`unmerge`."""
        if self.merged:
            raise ValueError("adapter is already merged; a second merge would apply it twice")
        if self.kind == NF4:
            raise ValueError(
                "cannot merge into an NF4 base: re-quantising silently erases small adapters. "
                "Use merge_and_unload(model, dtype=torch.bfloat16) for a 16-bit merged model."
            )
        v, g = self._direction()
        w = dense_weight(self.base)
        dead = (g == 0).nonzero().squeeze(1)
        self._merge_state = (g, dead, w[dead].clone())
        if self.weight_tied:
            # Note: the tied module (GPT-2's lm_head) keeps the shared tensor; unmerge puts it back.
            self._tied_original = self.base.weight
            merged = g[:, None] * v
            merged = (merged if self.kind == LINEAR else merged.t()).to(w.dtype).contiguous()
            self.base.weight = nn.Parameter(merged, requires_grad=False)
        else:
            self._write(g[:, None] * v)
        self._clear_cache()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W ← W / g − s·BA`` with the g of merge time; rows with g = 0 come back verbatim."""
        if not self.merged:
            raise ValueError("adapter is not merged; nothing to unmerge")
        g, dead, rows = (t.to(self.lora_A.device) for t in self._merge_state)
        if self.weight_tied:
            self.base.weight = self._tied_original
            del self._tied_original
        else:
            w = dense_weight(self.base)
            c = g.dtype
            ba = self.lora_B.to(c) @ self.lora_A.to(c)  # (out, r) @ (r, in)
            w0 = w.to(c) / torch.where(g == 0, torch.ones_like(g), g)[:, None] - self.scaling * ba
            w0[dead] = rows.to(c)
            self._write(w0)
        del self._merge_state
        self._clear_cache()
        self.merged = False

    # -- files and exports ------------------------------------------------------------------------
    def peft_keys(self) -> dict[str, str]:
        return {**super().peft_keys(), "lora_magnitude_vector": "lora_magnitude_vector"}

    def lora_factors(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        raise ValueError(
            "DoRA has no exact LoRA form: (m/‖W+sBA‖)(W+sBA) − W is full-rank in general. "
            "Use peftkit.merge_and_unload(model) for a merged model instead"
        )


def make_layer(base: nn.Module, config: AdapterConfig, spec: LayerSpec) -> DoraLayer:
    assert isinstance(config, LoraConfig)
    layer = DoraLayer(base, **layer_kwargs(config, spec))
    made_in = layer.lora_A.dtype
    if upcast_adapter(layer, config).lora_A.dtype != made_in:
        # Note: m = ‖W + sBA‖ again in fp32, not the half-precision rounding made at __init__.
        with torch.no_grad():
            layer.lora_magnitude_vector.copy_(layer.weight_norm())
    return layer


METHOD = Method(
    name="dora",
    config_cls=LoraConfig,
    make_layer=make_layer,
    reads=lambda d: (
        d.get("peft_type") == "LORA"
        and bool(d.get("use_dora"))
        and d.get("peftkit_method") in (None, "dora")
    ),
)
