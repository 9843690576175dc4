"""DoRA-Mao, dynamic rank distribution (Mao et al., ACL 2024, https://arxiv.org/abs/2405.17357;
official code MIkumikumi0116/DoRA). Not the weight-decomposed DoRA of Liu et al. (``use_dora``).

A rank-r₀ LoRA seen as r₀ single-rank components, each gated by a trainable scalar c_i (zero init)
and a pruning mask m_i ∈ {0, 1} (a buffer):

    ΔW = (α/r₀) · B diag(c ⊙ m) A = (α/r₀) · Σ_i c_i m_i B[:, i] A[i, :]
    y  = x W₀ᵀ + b + (α/r₀) · ((D(x) Aᵀ) ⊙ (c ⊙ m)) Bᵀ,   A ∈ R^{r₀×in}, B ∈ R^{out×r₀}

After each optimizer step (``after_step``, step t = 1, 2, …), with T = ``total_step``:

    s_i = |c_i m_i| ‖B[:, i]‖ ‖A[i, :]‖ / (‖ΔW‖_F + ε),  ‖ΔW‖_F² = (c⊙m)ᵀ((BᵀB) ⊙ (AAᵀ))(c⊙m)
    ŝ_i ← β ŝ_i + (1 − β) s_i                        (every step until pruning ends)
    p = int(t − start_ratio·T),  P = int(T (1 − start_ratio − end_ratio))
    at p ≥ 0 with p % prune_interval = 0 or p = P:  k = int(N (r₀ − r_T)/r₀ (p/P)³),
        τ = the max(k, 1)-th smallest ŝ over all N = M·r₀ components;  m_i = [ŝ_i > τ], c_i ← 0
        where m_i = 0;  at p = P the masks are final (c_i ← c_i m_i after every later step).

The DEM regulariser R = Σ_modules Σ_i [Var(A[i, :]) + Var(B[:, i])] / (2 r₀ M) (unbiased variance)
is applied as η ∇R added to the gradients in ``before_step`` until pruning ends: the user's loss
is never touched. Importance uses the closed forms above (O(r₀²(in + out))), not the official
r₀ × out × in tensor.

Note: a pruned component is masked (no output, no gradient) from the event that prunes it, and the
mask is recomputed at each event. The official code only zeroes c_i, which may drift back until the
next event. Masking keeps ``export_lora`` exact at any time: it writes the surviving components
(A[keep], B[:, keep] · c[keep] · α/r₀) as a plain PEFT LoRA, ranks per module in ``rank_pattern``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, check_finite_number, check_positive_int, check_probability
from ..core import EMBEDDING, Adapter, adapters, base_device, base_dtype
from ..precision import upcast_adapter
from .registry import LayerSpec, Method

EPS = 1e-8
UNATTACHED = (
    "a DoRA-Mao (dora_dynamic) layer ran a training forward before peftkit.attach(optimizer, "
    "model): until then nothing is pruned and DEM is off. Attach the optimizer (or use "
    "peftkit.integrations.hf.PeftkitCallback) before training."
)


@dataclass(frozen=True, kw_only=True)
class DoraDynamicConfig(AdapterConfig):
    """DoRA-Mao. ``target_r``: the average rank left after pruning (r_T); ``init_r``: the starting
    rank r₀ (default ⌈1.5 r_T⌉, as the paper); ``total_step``: optimizer steps of the run (T);
    pruning runs from ``start_ratio``·T to (1 − ``end_ratio``)·T, every ``prune_interval`` steps;
    ``beta``: importance EMA; ``regularization_loss_alpha``: η, the DEM weight. Defaults are the
    official code's (RoBERTa-base GLUE)."""

    target_r: int = 8
    init_r: int | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.1
    total_step: int | None = None
    start_ratio: float = 0.15
    end_ratio: float = 0.5
    prune_interval: int = 100
    beta: float = 0.9
    regularization_loss_alpha: float = 0.1

    peft_type: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("target_r", self.target_r)
        if self.init_r is None:
            object.__setattr__(self, "init_r", math.ceil(1.5 * self.target_r))
        check_positive_int("init_r", self.init_r)
        assert self.init_r is not None
        if self.init_r < self.target_r:
            raise ValueError(
                f"init_r={self.init_r} is below target_r={self.target_r}; pruning "
                "only removes ranks: use init_r >= target_r (default 1.5·target_r)"
            )
        if self.total_step is None:
            raise ValueError(
                "total_step is required: the number of optimizer steps of the run "
                "(the pruning schedule is a fraction of it), e.g. total_step=1000"
            )
        check_positive_int("total_step", self.total_step)
        check_positive_int("prune_interval", self.prune_interval)
        check_finite_number("lora_alpha", self.lora_alpha, positive=True)
        check_probability("lora_dropout", self.lora_dropout)
        check_probability("beta", self.beta)
        for name in ("start_ratio", "end_ratio"):
            check_probability(name, getattr(self, name))
        if self.start_ratio + self.end_ratio >= 1:
            raise ValueError(
                f"start_ratio + end_ratio = {self.start_ratio + self.end_ratio:g} "
                "leaves no pruning window; keep their sum below 1 (e.g. 0.15 + 0.5)"
            )
        check_finite_number("regularization_loss_alpha", self.regularization_loss_alpha)
        if self.regularization_loss_alpha < 0:
            raise ValueError(
                f"regularization_loss_alpha must be >= 0, got "
                f"{self.regularization_loss_alpha!r}; e.g. 0.1"
            )

    @property
    def method(self) -> str:
        return "dora_dynamic"

    @classmethod
    def required_keys(cls) -> tuple[str, ...]:
        return ("target_r", "total_step", "target_modules")


class DoraDynamicLayer(Adapter):
    """``base(x) + (α/r₀) · ((D(x) Aᵀ) ⊙ (c ⊙ m)) Bᵀ``; an embedding looks up A[:, x] instead."""

    roles: ClassVar[dict[str, str]] = {"lora_A": "A", "lora_B": "B", "lora_scaler": "scaler"}
    lora_mask: Tensor  # (r0,) 1 = kept, 0 = pruned

    def __init__(self, base: nn.Module, *, r: int, alpha: float, dropout: float) -> None:
        super().__init__(base, dropout=0.0 if isinstance(base, nn.Embedding) else dropout)
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        kw: dict[str, Any] = {"device": base_device(base), "dtype": base_dtype(base)}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        self.lora_scaler = nn.Parameter(torch.zeros(r, **kw))
        self.register_buffer("lora_mask", torch.ones(r, **kw))
        self.hooked = False
        with torch.no_grad():  # official init: kaiming-uniform with a = 0 on both, c = 0
            nn.init.kaiming_uniform_(self.lora_A)
            nn.init.kaiming_uniform_(self.lora_B)

    def gate(self) -> Tensor:
        """c ⊙ m · α/r₀, the per-component coefficient, shape (r₀,)."""
        return self.lora_scaler * self.lora_mask.to(self.lora_scaler.dtype) * self.scaling

    def update(self, x: Tensor) -> Tensor:
        if self.training and not self.hooked and torch.is_grad_enabled():
            warnings.warn(UNATTACHED, stacklevel=2)
        a = self.lora_A
        if self.kind == EMBEDDING:
            e = self.base
            assert isinstance(e, nn.Embedding)
            h = F.embedding(
                x, a.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse
            )  # (..., r0)
        else:
            h = F.linear(x.to(a.dtype), a)  # (..., r0)
        return F.linear(h * self.gate(), self.lora_B)  # (..., r0) ⊙ (r0,) -> (..., out)

    def delta_weight(self) -> Tensor:
        return (self.lora_B * self.gate()) @ self.lora_A  # (out, r0) @ (r0, in) -> (out, in)

    def factors(self) -> tuple[Tensor, Tensor] | None:
        if self.kind == EMBEDDING:
            return None
        return self.lora_A, self.lora_B * self.gate()

    @torch.no_grad()
    def importance(self) -> Tensor:
        """s_i = ‖c_i m_i B[:, i] A[i, :]‖_F / (‖B diag(c ⊙ m) A‖_F + ε), in fp32, shape (r₀,)."""
        a, b = self.lora_A.float(), self.lora_B.float()
        c = (self.lora_scaler * self.lora_mask).float()
        part = c.abs() * a.norm(dim=1) * b.norm(dim=0)  # (r0,)
        gram = (b.T @ b) * (a @ a.T)  # (r0, out)@(out, r0) ⊙ (r0, in)@(in, r0) -> (r0, r0)
        total = (c @ gram @ c).clamp_min(0).sqrt()
        score: Tensor = part / (total + EPS)
        return score

    @torch.no_grad()
    def dem_grads(self, weight: float) -> tuple[Tensor, Tensor]:
        """``weight`` · ∂/∂(A, B) of Σ_i Var(A[i, :]) + Var(B[:, i]) / 2 (unbiased variance)."""
        a, b = self.lora_A, self.lora_B
        ga = (a - a.mean(dim=1, keepdim=True)) * (weight / max(a.shape[1] - 1, 1))  # (r0, in)
        gb = (b - b.mean(dim=0, keepdim=True)) * (weight / max(b.shape[0] - 1, 1))  # (out, r0)
        return ga, gb

    def lora_factors(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        if rank is not None:
            raise ValueError(
                "DoRA-Mao exports its surviving components, whose number is learned "
                f"per module; call export_lora without rank= (got rank={rank})"
            )
        keep = self.lora_mask.nonzero().flatten()
        if keep.numel() == 0:  # every component pruned: ΔW = 0, written as a zero rank-1 LoRA
            a = self.lora_A.new_zeros(1, self.in_features)
            return a, self.lora_B.new_zeros(self.out_features, 1)
        g = self.gate().detach()[keep]  # (k,)
        return self.lora_A.detach()[keep], self.lora_B.detach()[:, keep] * g  # (k, in), (out, k)

    def peft_keys(self) -> dict[str, str]:
        return {
            "lora_A": "lora_A.weight",
            "lora_B": "lora_B.weight",
            "lora_scaler": "lora_scaler",
            "lora_mask": "lora_mask",
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r0={self.r}, kept={int(self.lora_mask.sum())}"


class DoraDynamicHook:
    """Importance EMA, the cubic pruning schedule and DEM, once per optimizer step."""

    def __init__(self, layers: Sequence[DoraDynamicLayer], config: DoraDynamicConfig) -> None:
        assert config.total_step is not None and config.init_r is not None
        self.layers, self.config = list(layers), config
        self.r0, self.T = config.init_r, config.total_step
        self.window = int(self.T * (1 - config.start_ratio - config.end_ratio))  # P
        self.step, self.final = 0, False
        self.scores = [torch.zeros(a.r, device=a.lora_mask.device) for a in self.layers]

    def on_attach(self) -> None:
        for a in self.layers:
            a.hooked = True

    def position(self, t: int) -> int:
        """p = int(t − start_ratio·T): the step's place in the pruning window (official form)."""
        return int(t - self.config.start_ratio * self.T)

    def _k(self, p: int) -> int:
        frac = 1.0 if self.window == 0 else p / self.window
        return int(
            len(self.layers) * self.r0 * ((self.r0 - self.config.target_r) / self.r0) * frac**3
        )

    @torch.no_grad()
    def before_step(self) -> None:
        eta = self.config.regularization_loss_alpha
        if self.final or eta == 0:
            return
        weight = eta / (self.r0 * len(self.layers))  # ∂R/∂· carries 2/(2 r0 M)
        for layer in self.layers:
            for p, g in zip((layer.lora_A, layer.lora_B), layer.dem_grads(weight), strict=True):
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g.to(p.grad.dtype))

    @torch.no_grad()
    def after_step(self) -> None:
        self.step += 1
        p = self.position(self.step)
        if p > self.window:
            if self.final:  # keep c = 0 on pruned components, as the official code does
                for layer in self.layers:
                    layer.lora_scaler.mul_(layer.lora_mask.to(layer.lora_scaler.dtype))
            return
        beta = self.config.beta
        for i, layer in enumerate(self.layers):
            s = layer.importance()
            self.scores[i] = self.scores[i].to(s.device).mul_(beta).add_(s, alpha=1 - beta)
        if p < 0 or (p % self.config.prune_interval != 0 and p != self.window):
            return
        self.prune(max(self._k(p), 1))
        if p == self.window:
            self.final = True

    @torch.no_grad()
    def prune(self, k: int) -> None:
        """Mask every component whose score is ≤ the k-th smallest over all modules."""
        flat = torch.cat([s.to(self.scores[0].device) for s in self.scores])  # (N,)
        tau = torch.kthvalue(flat, k).values
        for score, layer in zip(self.scores, self.layers, strict=True):
            keep = (score > tau.to(score.device)).to(layer.lora_mask)
            layer.lora_mask.copy_(keep)
            layer.lora_scaler.mul_(keep.to(layer.lora_scaler.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "final": self.final,
            "scores": [s.clone() for s in self.scores],
            "masks": [a.lora_mask.clone() for a in self.layers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.final = int(state["step"]), bool(state["final"])
        if len(state["scores"]) != len(self.layers):
            raise ValueError(
                f"hook state holds {len(state['scores'])} DoRA-Mao layers, the model "
                f"has {len(self.layers)}; was it saved from a different adapter?"
            )
        self.scores = [
            s.to(a.lora_mask.device, torch.float32).clone()
            for s, a in zip(state["scores"], self.layers, strict=True)
        ]
        for a, mask in zip(self.layers, state["masks"], strict=True):
            a.lora_mask.copy_(mask)


def ranks(model: nn.Module) -> dict[str, int]:
    """Surviving components per DoRA-Mao layer, by module path (for ``peftkit inspect``)."""
    found = {
        n: int(a.lora_mask.sum()) for n, a in adapters(model) if isinstance(a, DoraDynamicLayer)
    }
    if not found:
        raise ValueError("model has no DoRA-Mao layers; adapt it with DoraDynamicConfig first")
    return found


def make_layer(base: nn.Module, config: AdapterConfig, spec: LayerSpec) -> DoraDynamicLayer:
    assert isinstance(config, DoraDynamicConfig) and config.init_r is not None
    layer = DoraDynamicLayer(
        base, r=config.init_r, alpha=float(config.lora_alpha), dropout=config.lora_dropout
    )
    # Note: a new module starts in training mode; follow the base so an eval-mode model stays so.
    return upcast_adapter(layer, config).train(base.training)


def make_hook(
    model: nn.Module, config: AdapterConfig, layers: Sequence[tuple[str, Adapter]]
) -> DoraDynamicHook:
    assert isinstance(config, DoraDynamicConfig)
    return DoraDynamicHook([a for _, a in layers if isinstance(a, DoraDynamicLayer)], config)


METHOD = Method(
    name="dora_dynamic",
    config_cls=DoraDynamicConfig,
    make_layer=make_layer,
    make_hook=make_hook,
    reads=lambda d: d.get("peft_type") == "LORA" and d.get("peftkit_method") == "dora_dynamic",
)
