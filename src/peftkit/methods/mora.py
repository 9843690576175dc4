"""MoRA: high-rank updating with one square matrix (Jiang et al., 2024,
https://arxiv.org/abs/2405.12130; official code kongds/MoRA).

    y = x W₀ᵀ + b + f_decomp(M · f_comp(D(x))),   M ∈ R^{r̂×r̂}, zero init,  r̂ = round(√((in+out)·r))

``f_comp: R^in → R^r̂`` and ``f_decomp: R^r̂ → R^out`` have no parameters, so r̂² ≈ the parameters of
a rank-r LoRA. With k = in, d = out, n = ⌈k / r̂⌉, the input is padded by wrap-around to n·r̂
features (x̃_i = x_{i mod k}: the first features count twice, never zeros).

* type 1 (sharing, strided): c = Σ_b x̃_b over the n blocks of r̂; Δh_i = (M c)_{i mod r̂} (tile).
* type 2 (grouped): c sums contiguous groups of x (the first k mod r̂ groups one larger);
  Δh repeats each (M c)_j over a contiguous run (repeat-interleave, the first d mod r̂ runs longer).
* type 3: grouped compression, tiled decompression.  type 4: strided compression, repeated.
* type 6 (rotation, paper Eq. 9): u_b = M R_b x̃_b for every block b, R_b the RoPE rotation by
  angles b·θ (θ_j = 10000^{-2j/r̂}, rotate-half convention); Δh_i = u_{i mod n·r̂}. r̂ is even.

Types 1–4 give ΔW = T M S with S (r̂, k) the compression counts and T (d, r̂) a row selection:
rank ≤ r̂, so an exact LoRA exists. Type 6 is block-diagonal, full rank in general.

Unlike the official code, every type is defined for r̂ ≥ in (n = 1, x̃ wraps as often as needed),
merges GPT-2 Conv1D layers in their own orientation, and keeps cos/sin as buffers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, check_positive_int, check_probability
from ..core import EMBEDDING, Adapter, base_device, base_dtype, layer_kind
from ..precision import upcast_adapter
from .registry import LayerSpec, Method

MORA_TYPES = (1, 2, 3, 4, 6)
ROPE_BASE = 10000.0


@dataclass(frozen=True, kw_only=True)
class MoraConfig(AdapterConfig):
    """MoRA. ``r``: the LoRA-equivalent rank (each layer's r̂ follows from it and its shape);
    ``mora_type``: 1, 2, 3, 4 (sharing variants: rank ≤ r̂, exportable as LoRA) or 6 (RoPE
    rotation: full rank; the README advises 6 for small r, 1 for large r);
    ``lora_dropout``: dropout on the branch input (the official scripts use 0.05)."""

    r: int = 8
    mora_type: int = 6
    lora_dropout: float = 0.0

    peft_type: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        if isinstance(self.mora_type, bool) or self.mora_type not in MORA_TYPES:
            raise ValueError(
                f"mora_type={self.mora_type!r} is not a MoRA type; use 1 (sharing, for large r) "
                "or 6 (rotation, for small r), or the ReMoRA groupings 2, 3, 4"
            )
        check_probability("lora_dropout", self.lora_dropout)

    @property
    def method(self) -> str:
        return "mora"

    @classmethod
    def required_keys(cls) -> tuple[str, ...]:
        return ("r", "mora_type", "target_modules")


def r_hat(in_features: int, out_features: int, r: int, mora_type: int) -> int:
    """The side of M: √((in+out)·r) rounded to nearest (the official code; the paper floors),
    then down to even for type 6, whose rotation pairs features."""
    rh = int(math.sqrt((in_features + out_features) * r) + 0.5)
    if mora_type == 6:
        rh -= rh % 2
    if rh < (2 if mora_type == 6 else 1):
        raise ValueError(
            f"r={r} gives r̂={rh} for a {in_features}→{out_features} layer, too small for "
            f"mora_type={mora_type}; raise r"
        )
    return rh


def _groups(size: int, n_groups: int) -> Tensor:
    """Contiguous groups of ``range(size)``: the first ``size mod n_groups`` hold one more."""
    q, m = divmod(size, n_groups)
    sizes = torch.tensor([q + 1] * m + [q] * (n_groups - m))
    return torch.repeat_interleave(torch.arange(n_groups), sizes)  # (size,) group of each index


def rope_tables(n_blocks: int, rh: int) -> tuple[Tensor, Tensor]:
    """cos and sin of block b's angles b·θ, θ = [θ_0..θ_{r̂/2-1}] twice: two (n, r̂) fp64 tables.

    Note: computed in fp64 (the official code uses fp32, a difference of ~1e-7)."""
    f64 = torch.float64
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, rh, 2, dtype=f64) / rh))  # (r̂/2,)
    angles = torch.outer(torch.arange(n_blocks, dtype=f64), inv_freq)  # (n, r̂/2)
    angles = torch.cat([angles, angles], dim=-1)  # (n, r̂)
    return angles.cos(), angles.sin()


def _rotate_half(z: Tensor) -> Tensor:
    h = z.shape[-1] // 2
    return torch.cat([-z[..., h:], z[..., :h]], dim=-1)


def wrap_pad(x: Tensor, width: int) -> Tensor:
    """``(..., k)`` → ``(..., width)`` with x̃_i = x_{i mod k} (wrap-around, never zeros)."""
    k = x.shape[-1]
    if width == k:
        return x
    if width <= 2 * k:
        return torch.cat([x, x[..., : width - k]], dim=-1)  # (..., width)
    return x[..., torch.arange(width, device=x.device) % k]  # (..., width): r̂ > 2k wraps more


def wrap_fold(g: Tensor, k: int) -> Tensor:
    """The adjoint of :func:`wrap_pad`: ``(..., width)`` → ``(..., k)``, wrapped entries summed."""
    width = g.shape[-1]
    if width == k:
        return g
    if width <= 2 * k:
        out = g[..., :k].clone()  # (..., k)
        out[..., : width - k] += g[..., k:]
        return out
    idx = torch.arange(width, device=g.device) % k
    return g.new_zeros(*g.shape[:-1], k).index_add_(-1, idx, g)  # (..., k)


def compress(
    x: Tensor, rh: int, mora_type: int, rope: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """f_comp: ``(..., k)`` → ``(..., r̂)`` for types 1–4, ``(..., n, r̂)`` (rotated blocks) for 6."""
    k, lead = x.shape[-1], x.shape[:-1]
    if mora_type in (2, 3):
        q, m = divmod(k, rh)
        head = x[..., : m * (q + 1)].reshape(*lead, m, q + 1).sum(-1)  # (..., m)
        tail = x[..., m * (q + 1) :].reshape(*lead, rh - m, q).sum(-1)  # (..., r̂ - m)
        return torch.cat([head, tail], dim=-1)  # (..., r̂)
    n = -(-k // rh)
    blocks = wrap_pad(x, n * rh).reshape(*lead, n, rh)  # (..., n, r̂)
    if mora_type in (1, 4):
        return blocks.sum(-2)  # (..., r̂)
    cos, sin = rope if rope is not None else rope_tables(n, rh)
    rotated: Tensor = blocks * cos.to(x) + _rotate_half(blocks) * sin.to(x)  # (..., n, r̂)
    return rotated


def decompress_index(out_features: int, width: int, mora_type: int) -> Tensor:
    """For each output feature, the index of the core output (of ``width``) it copies."""
    if mora_type in (2, 4):
        return _groups(out_features, width)  # repeat-interleave
    return torch.arange(out_features) % width  # tile (type 6: truncate when n r̂ ≥ out)


def decompress(y: Tensor, out_features: int, mora_type: int) -> Tensor:
    """f_decomp: ``(..., r̂)`` (types 1–4) or ``(..., n, r̂)`` (type 6) → ``(..., out)``.

    Copies are expand + reshape, whose backward is a plain sum (a gather's is a scatter)."""
    if mora_type == 6:
        y = y.flatten(-2)  # (..., n r̂)
    lead, w = y.shape[:-1], y.shape[-1]
    if mora_type in (2, 4):
        q, m = divmod(out_features, w)
        head = y[..., :m, None].expand(*lead, m, q + 1).reshape(*lead, m * (q + 1))
        tail = y[..., m:, None].expand(*lead, w - m, q).reshape(*lead, (w - m) * q)
        return torch.cat([head, tail], dim=-1)  # (..., out)
    reps = -(-out_features // w)
    if reps > 1:
        y = y[..., None, :].expand(*lead, reps, w).reshape(*lead, reps * w)  # (..., reps w)
    return y[..., :out_features]  # (..., out)


def rotated_cores(m: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Q_b = M R_b for every block: ``(n, r̂, r̂)`` from M ``(r̂, r̂)`` and the ``(n, r̂)`` tables.

    R_b = diag(cos_b) + diag(sin_b) J with J z = rotate_half(z), and X J = [X[:, h:], -X[:, :h]]."""
    ms = m * sin[:, None, :]  # (n, r̂, r̂)
    h = m.shape[-1] // 2
    return m * cos[:, None, :] + torch.cat([ms[..., h:], -ms[..., :h]], dim=-1)  # (n, r̂, r̂)


def compress_positions(in_features: int, rh: int, mora_type: int) -> tuple[Tensor, Tensor]:
    """Compression of types 1–4 as (feature, slot) pairs: c_slot = Σ x_feature over the pairs;
    also, for type 6, (feature, position in the padded input of n·r̂)."""
    if mora_type in (2, 3):
        return torch.arange(in_features), _groups(in_features, rh)
    n = -(-in_features // rh)
    pos = torch.arange(n * rh)
    return pos % in_features, (pos if mora_type == 6 else pos % rh)


def block_core(x: Tensor, m: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Type 6's core ``u_b = (M R_b) x̃_b`` as plain differentiable ops, (..., n, r̂)."""
    q = rotated_cores(m, cos, sin)  # (n, r̂, r̂)
    n, rh = q.shape[0], q.shape[1]
    xt = wrap_pad(x, n * rh).reshape(*x.shape[:-1], n, rh)  # (..., n, r̂)
    return torch.einsum("...ni,nji->...nj", xt, q)  # (..., n, r̂)


class _BlockCore(torch.autograd.Function):
    """Type 6's core ``u_b = Q_b x̃_b`` with Q_b = M R_b, keeping only ``x`` and M for backward.

    Note: rotating M (n r̂² numbers) instead of the activations saves every elementwise pass
    over them. x̃ is a copy of x when padded and Q is new at every call, while x is one tensor
    shared by every adapter on the same input (q, k, v): backward re-pads x and rebuilds Q."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, m: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(x, m, cos, sin)
        return block_core(x, m, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, m, cos, sin = ctx.saved_tensors
        with torch.enable_grad():
            md = m.detach().requires_grad_(ctx.needs_input_grad[1])
            q = rotated_cores(md, cos, sin)  # (n, r̂, r̂)
        n, rh = q.shape[0], q.shape[1]
        grad_x = grad_m = None
        if ctx.needs_input_grad[1]:
            xt = wrap_pad(x, n * rh).reshape(*x.shape[:-1], n, rh)  # (..., n, r̂)
            grad_q = torch.einsum("...nj,...ni->nji", grad, xt)  # (n, r̂, r̂)
            (grad_m,) = torch.autograd.grad(q, md, grad_q)  # (r̂, r̂)
        if ctx.needs_input_grad[0]:
            gxt = torch.einsum("...nj,nji->...ni", grad, q.detach())  # (..., n, r̂)
            grad_x = wrap_fold(gxt.reshape(*x.shape[:-1], n * rh), x.shape[-1])  # (..., k)
        return grad_x, grad_m, None, None


class MoraLayer(Adapter):
    """``base(x) + f_decomp(M f_comp(D(x)))`` with M zero at init."""

    roles: ClassVar[dict[str, str]] = {"M": "M"}

    def __init__(self, base: nn.Module, *, r: int, mora_type: int, dropout: float = 0.0) -> None:
        super().__init__(base, dropout=dropout)
        self.r, self.mora_type = r, mora_type
        self.r_hat = r_hat(self.in_features, self.out_features, r, mora_type)
        self.n_blocks = -(-self.in_features // self.r_hat)
        kw: dict[str, Any] = {"device": base_device(base), "dtype": base_dtype(base)}
        self.M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat, **kw))
        dev = kw["device"]
        if mora_type == 6:
            cos, sin = rope_tables(self.n_blocks, self.r_hat)
            tab = {"device": dev, "dtype": torch.promote_types(kw["dtype"], torch.float32)}
            self.register_buffer("rope_cos", cos.to(**tab), persistent=False)  # (n, r̂)
            self.register_buffer("rope_sin", sin.to(**tab), persistent=False)  # (n, r̂)

    rope_cos: Tensor
    rope_sin: Tensor

    def update(self, x: Tensor) -> Tensor:
        x = x.to(self.M.dtype)
        if self.mora_type == 6:
            cos, sin = self.rope_cos.to(x), self.rope_sin.to(x)  # (n, r̂)
            if torch.compiler.is_compiling():
                # Note: a compiled graph differentiates the plain ops (its partitioner picks what
                # to save); the hand-written backward calls autograd.grad, which it cannot trace.
                y: Tensor = block_core(x, self.M, cos, sin)
            else:
                y = _BlockCore.apply(x, self.M, cos, sin)  # type: ignore[no-untyped-call]
        else:
            y = F.linear(compress(x, self.r_hat, self.mora_type), self.M)  # (..., r̂)
        return decompress(y, self.out_features, self.mora_type)  # (..., out)

    def _out_index(self) -> Tensor:
        width = self.r_hat * (self.n_blocks if self.mora_type == 6 else 1)
        return decompress_index(self.out_features, width, self.mora_type).to(self.M.device)

    def delta_weight(self) -> Tensor:
        k, d, rh, m = self.in_features, self.out_features, self.r_hat, self.M
        feature, slot = (t.to(m.device) for t in compress_positions(k, rh, self.mora_type))
        if self.mora_type != 6:
            # ΔW = T M S: column `feature` gains column `slot` of the selected rows of M.
            rows = m[self._out_index()]  # (d, r̂)
            return m.new_zeros(d, k).index_add_(1, feature, rows[:, slot])  # (d, k)
        n = self.n_blocks
        q = rotated_cores(m, self.rope_cos.to(m), self.rope_sin.to(m))  # (n, r̂, r̂)
        # Block b maps padded positions b·r̂.. to rows b·r̂..; scatter positions to features.
        cols = feature.view(n, 1, rh).expand(n, rh, rh)  # (n, r̂, r̂)
        padded = m.new_zeros(n, rh, k).scatter_add_(2, cols, q)  # (n, r̂, k)
        return padded.reshape(n * rh, k)[self._out_index()]  # (d, k)

    def lora_factors(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        if self.mora_type == 6:
            raise ValueError(
                "MoRA type 6 (rotation) has no exact LoRA form: its update is block-diagonal and "
                "full-rank in general; use peftkit.merge_and_unload(model) for a merged model"
            )
        if rank is not None and rank != self.r_hat:
            raise ValueError(
                f"this MoRA layer is exactly a rank-{self.r_hat} LoRA (r̂); export it without "
                f"rank= (got rank={rank})"
            )
        feature, slot = compress_positions(self.in_features, self.r_hat, self.mora_type)
        m = self.M.detach()
        # S (r̂, k): how often feature c enters slot j; B = T M: the selected rows of M.
        s = m.new_zeros(self.r_hat, self.in_features)
        s.index_put_(
            (slot.to(m.device), feature.to(m.device)),
            torch.ones(len(slot), dtype=m.dtype, device=m.device),
            accumulate=True,
        )
        return s, m[self._out_index()]  # (r̂, k), (d, r̂)

    def peft_keys(self) -> dict[str, str]:
        # Note: the official fork stores M as lora_A (and again as lora_B); stock PEFT refuses a
        # square lora_A by shape, never loading it as a silently wrong LoRA.
        return {"M": "lora_A.weight"}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, r_hat={self.r_hat}, type={self.mora_type}"


def check(model: nn.Module, config: MoraConfig, targets: Sequence[tuple[str, nn.Module]]) -> None:
    emb = [name for name, m in targets if layer_kind(m) == EMBEDDING]
    if emb:
        raise ValueError(
            f"MoRA cannot adapt embedding layers ({emb[:3]}): its compression acts on dense "
            "inputs. Remove them from target_modules, or use LoraConfig for embeddings."
        )


def make_layer(base: nn.Module, config: AdapterConfig, spec: LayerSpec) -> MoraLayer:
    assert isinstance(config, MoraConfig)
    layer = MoraLayer(base, r=config.r, mora_type=config.mora_type, dropout=config.lora_dropout)
    return upcast_adapter(layer, config)


METHOD = Method(
    name="mora",
    config_cls=MoraConfig,
    make_layer=make_layer,
    reads=lambda d: d.get("peftkit_method") == "mora",
    check=check,
)
