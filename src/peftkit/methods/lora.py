"""LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) and rsLoRA scaling
(Kalajdzievski, 2023, https://arxiv.org/abs/2312.03732).

    y = x W₀ᵀ + b + s · (D(x) Aᵀ) Bᵀ,   A ∈ R^{r×in}, B ∈ R^{out×r},
    s = α / r   (rsLoRA: s = α / √r)

A starts kaiming-uniform (a = √5) and B at zero, so the adapted model starts equal to the base
(PEFT's default). For an embedding the roles flip (A = 0, B ~ N(0, 1)) because A is indexed like a
lookup table. Dropout acts on the branch's input only; PEFT applies none to embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, check_finite_number, check_positive_int, check_probability
from ..core import EMBEDDING, Adapter, base_device, base_dtype, bypassable
from ..precision import upcast_adapter
from .registry import LayerSpec, Method

# PEFT LoraConfig keys peftkit does not implement, with the value that means "off".
LORA_UNSUPPORTED: dict[str, Any] = {
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "corda_config": None,
    "eva_config": None,
    "kasa_config": None,
    "lora_ga_config": None,
    "megatron_config": None,
    "monteclora_config": None,
    "velora_config": None,
    "use_bdlora": None,
    "ensure_weight_tying": False,
    "loftq_config": {},
    "bias": "none",
}


@dataclass(frozen=True, kw_only=True)
class LoraConfig(AdapterConfig):
    """LoRA. ``r``: rank; ``lora_alpha``: α in s = α/r, default 8 whatever ``r`` is (PEFT's
    default; ``peftkit train --alpha`` defaults to it too); ``use_rslora``: s = α/√r;
    ``init_lora_weights``: True (kaiming A, zero B), ``"gaussian"`` (A ~ N(0, 1/r)) or False
    (both random: the adapter is not a no-op; for tests); ``rank_pattern``/``alpha_pattern``:
    per-module overrides keyed by a name suffix or regex, as PEFT. ``use_dora=True`` selects
    weight-decomposed DoRA (Liu et al., 2024), which PEFT files as a LoRA flag."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_dora: bool = False

    peft_type: ClassVar[str | None] = "LORA"
    unsupported_keys: ClassVar[Mapping[str, Any]] = LORA_UNSUPPORTED

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_finite_number("lora_alpha", self.lora_alpha, positive=True)
        check_probability("lora_dropout", self.lora_dropout)
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True "
                "(PEFT default), 'gaussian' or False. Data-driven inits (pissa, olora, loftq, "
                "eva, corda) change the base weights and are not implemented."
            )
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for k, v in dict(self.rank_pattern).items():
            check_positive_int(f"rank_pattern[{k!r}]", v)
        for k, a in dict(self.alpha_pattern).items():
            check_finite_number(f"alpha_pattern[{k!r}]", a, positive=True)
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))

    @property
    def method(self) -> str:
        return "dora" if self.use_dora else "lora"

    @classmethod
    def required_keys(cls) -> tuple[str, ...]:
        return ("r", "target_modules")

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


class _MergedLinearLora(torch.autograd.Function):
    """``y = x (W + s·BA)ᵀ + b`` for a frozen ``nn.Linear`` base: one wide GEMM per direction
    instead of the base's plus two rank-r ones.

    Forward forms ``W' = W + s·BA`` (out·in·r FLOPs, a temporary the size of W) and runs one
    GEMM; backward forms W' again for ``dx = dy W'`` and computes ``dA = s (dy B)ᵀ x`` and
    ``dB = s dyᵀ (x Aᵀ)``. It saves only x (which the base saves anyway) and references to
    W, A, B: not even LoRA's (T, r) activation. Worth it when the tokens T outnumber
    ``in·out/(in+out)``, where forming W' costs less than the rank-r GEMMs it replaces."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, s: float
    ) -> Tensor:
        # Note: fp32 factors on a 16-bit base run in the base's dtype (as under autocast); their
        # gradients are cast back to fp32.
        a_, b_ = a.to(weight.dtype), b.to(weight.dtype)
        merged = torch.addmm(weight, b_, a_, alpha=s)  # (out, in) + s·(out, r) @ (r, in)
        ctx.save_for_backward(x, weight, a, b)
        ctx.scaling = s
        return F.linear(x, merged, bias)  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, a, b = ctx.saved_tensors
        s = ctx.scaling
        a_, b_ = a.to(weight.dtype), b.to(weight.dtype)
        need_x, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (T, in), (T, out)
        dx = d_a = d_b = d_bias = None
        if need_x:
            dx = (dy2 @ torch.addmm(weight, b_, a_, alpha=s)).view(x.shape)  # (T, out) @ (out, in)
        if need_a:
            d_a = ((dy2 @ b_).t() @ x2).mul_(s).to(a.dtype)  # ((T, out) @ (out, r))ᵀ @ (T, in)
        if need_b:
            d_b = (dy2.t() @ (x2 @ a_.t())).mul_(s).to(b.dtype)  # (out, T) @ ((T, in) @ (in, r))
        if need_bias:
            d_bias = dy2.sum(0)
        return dx, None, d_bias, d_a, d_b, None


class LoraLayer(Adapter):
    """``base(x) + s · (D(x) Aᵀ) Bᵀ``; on an embedding, ``s · A[:, x]ᵀ Bᵀ``."""

    #: Train through :class:`_MergedLinearLora` where it applies (set False to compare).
    merged_matmul: ClassVar[bool] = True

    roles: ClassVar[dict[str, str]] = {"lora_A": "A", "lora_B": "B"}

    def __init__(
        self,
        base: nn.Module,
        *,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float = 0.0,
        init: bool | str = True,
    ) -> None:
        super().__init__(base, dropout=0.0 if layer_is_embedding(base) else dropout)
        self.r, self.lora_alpha, self.scaling = r, alpha, scaling
        device, dtype = base_device(base), base_dtype(base)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: bool | str = True) -> None:
        if self.kind == EMBEDDING:
            nn.init.zeros_(self.lora_A) if init is not False else nn.init.normal_(self.lora_A)
            nn.init.normal_(self.lora_B)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def update(self, x: Tensor) -> Tensor:
        if self.kind == EMBEDDING:
            e = self.base
            assert isinstance(e, nn.Embedding)
            h = F.embedding(
                x,
                self.lora_A.T,
                e.padding_idx,
                e.max_norm,
                e.norm_type,
                e.scale_grad_by_freq,
                e.sparse,
            )  # (..., r)
        else:
            # Note: the scale multiplies the rank-r activation, not the wide output: cheaper, and
            # it saves nothing extra for backward.
            h = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return F.linear(h * self.scaling, self.lora_B)  # (..., out)

    def _base_computable_here(self, x: Tensor) -> bool:
        """What every fused path needs to compute the base itself instead of calling it: nothing
        hooks the base, W is a frozen plain Parameter, x and W share a dtype (A too, or A is the
        fp32 of a 16-bit base: ``autocast_adapter_dtype``), no autocast."""
        w = self.base.weight
        return (
            bypassable(self.base)
            and type(w) is nn.Parameter
            and not w.requires_grad
            and x.dtype == w.dtype
            and (self.lora_A.dtype == w.dtype or self.lora_A.dtype == torch.float32)
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _merged_ok(self, x: Tensor) -> bool:
        if not (self.merged_matmul and type(self.base) is nn.Linear and torch.is_grad_enabled()):
            return False
        tokens = x.numel() // max(x.shape[-1], 1)
        return (
            self._base_computable_here(x)
            and isinstance(self.dropout, nn.Identity)
            and tokens * (self.in_features + self.out_features)
            >= self.in_features * self.out_features
        )

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not (self.disabled or self.merged) and self._merged_ok(x):
            base = self.base
            y: Tensor = _MergedLinearLora.apply(  # type: ignore[no-untyped-call]
                x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling
            )
            return y
        out: Tensor = self.base(x, *args, **kwargs)
        if self.disabled or self.merged:
            return out
        if self.kind == EMBEDDING or type(self).update is not LoraLayer.update:
            return out + self.update(self.dropout(x)).to(out.dtype)
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A) * self.scaling  # (..., r)
        if h.dtype != out.dtype or not out.is_contiguous():
            return out + F.linear(h, self.lora_B).to(out.dtype)
        # Note: one GEMM that accumulates onto the base output (beta = 1) instead of a GEMM and
        # then an add over the wide (..., out) tensor; autograd saves the same h and B.
        o, r = out.shape[-1], h.shape[-1]
        flat = torch.addmm(out.reshape(-1, o), h.reshape(-1, r), self.lora_B.T)  # (N, out)
        return flat.view(out.shape)

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    def factors(self) -> tuple[Tensor, Tensor] | None:
        if self.kind == EMBEDDING:
            return None
        return self.lora_A, self.lora_B * self.scaling  # (r, in), (out, r)

    def lora_factors(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        if rank is not None and rank != self.r:
            raise ValueError(
                f"a LoRA of rank {self.r} has no exact rank-{rank} form; export it without "
                "rank=, or train a DyLoRA adapter, which can be truncated"
            )
        return self.lora_A.detach(), self.lora_B.detach() * self.scaling

    def peft_keys(self) -> dict[str, str]:
        if self.kind == EMBEDDING:
            return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
        return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


def layer_is_embedding(base: nn.Module) -> bool:
    return isinstance(base, nn.Embedding)


def layer_kwargs(config: Any, spec: LayerSpec) -> dict[str, Any]:
    """The keyword arguments of a LoRA-shaped layer for the module at ``spec``: rank and alpha
    after ``rank_pattern``/``alpha_pattern``, the scale, dropout and init (shared by LoRA, DoRA
    and LoRA-FA)."""
    r = int(spec.pattern_value(config.rank_pattern, config.r))
    alpha = float(spec.pattern_value(config.alpha_pattern, config.lora_alpha))
    return dict(
        r=r,
        alpha=alpha,
        scaling=config.scaling(r, alpha),
        dropout=config.lora_dropout,
        init=config.init_lora_weights,
    )


def make_layer(base: nn.Module, config: AdapterConfig, spec: LayerSpec) -> LoraLayer:
    assert isinstance(config, LoraConfig)
    return upcast_adapter(LoraLayer(base, **layer_kwargs(config, spec)), config)


METHOD = Method(
    name="lora",
    config_cls=LoraConfig,
    make_layer=make_layer,
    reads=lambda d: (
        d.get("peft_type") == "LORA"
        and not d.get("use_dora")
        and d.get("peftkit_method") in (None, "lora")
    ),
)
