"""LoRA-FA: LoRA with a frozen projection-down (Zhang et al., 2023,
https://arxiv.org/abs/2308.03303; v2 adds the gradient correction, https://arxiv.org/abs/2308.03303v2).

    h = W₀x + s · B (A D(x)),   z = A D(x) ∈ R^r,   A ∈ R^{r×in} frozen, B ∈ R^{out×r} trained
    ∇B = s · Σ_tokens g zᵀ          ∇x = W₀ᵀg + s · D'(Aᵀ(Bᵀg))          (no ∇A)

A starts as LoRA's (kaiming-uniform, a = √5) and never trains; B starts at zero. Its reason to
exist is memory: LoRA keeps every adapted layer's input x (``in`` values per token) to form ∇A;
LoRA-FA keeps only z (``r`` values per token). :class:`_FrozenABranch` makes that explicit — its
saved tensors are z and the (parameter) factors, nothing input-sized — and regenerates the dropout
mask in backward from a seed, so ``lora_dropout > 0`` keeps the saving (``nn.Dropout`` would save an
x-sized mask per layer: more than LoRA without dropout). The frozen base needs no saved input
either: torch's linear saves its input only when the weight requires a gradient.

Files are plain PEFT LoRA files (``peft_type: "LORA"``, plus ``peftkit_method: "lora_fa"``):
PEFT loads them as a LoRA with identical outputs. Embedding targets are refused: their input is
integer ids (nothing to save) and their A starts at zero, so a frozen A would never learn.

``gradient_correction=True`` applies LoRA-FA v2's projection (what PEFT's ``LoraFAOptimizer``
does) before each optimizer step, through :func:`peftkit.attach`: the B-gradient whose weight
change ``s·g̃_B A`` is closest (Frobenius) to the full gradient ``G = ∂L/∂W``,

    g̃_B = g_B (A Aᵀ + δI)⁺ / s²,   so   s · g̃_B A = G Aᵀ(AAᵀ)⁻¹A   (G projected on A's row space),

computed in fp32 (PEFT runs it under bf16 autocast where bf16 is available) and then handed to
any optimizer. Pairs are found by module, not by parameter order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from ..config import AdapterConfig, check_finite_number, check_positive_int, check_probability
from ..core import EMBEDDING, Adapter, layer_kind
from ..precision import upcast_adapter
from .attached import expect_hook, mark_attached, unattached_message, warn_if_unattached
from .lora import LORA_UNSUPPORTED, LoraLayer, layer_kwargs
from .registry import LayerSpec, Method

#: PEFT's ridge on A Aᵀ before the pseudo-inverse
RIDGE = 1e-8


@dataclass(frozen=True, kw_only=True)
class LoraFAConfig(AdapterConfig):
    """LoRA-FA. Fields as :class:`peftkit.LoraConfig` (PEFT's names); ``gradient_correction``:
    project B's gradient as LoRA-FA v2 / PEFT's ``LoraFAOptimizer`` (needs
    ``peftkit.attach(optimizer, model)``)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    gradient_correction: bool = False

    peft_type: ClassVar[str | None] = "LORA"
    unsupported_keys: ClassVar[Mapping[str, Any]] = {**LORA_UNSUPPORTED, "use_dora": False}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_finite_number("lora_alpha", self.lora_alpha, positive=True)
        check_probability("lora_dropout", self.lora_dropout)
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True "
                "(PEFT default), 'gaussian' or False"
            )
        for name in ("use_rslora", "gradient_correction"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for k, n in dict(self.rank_pattern).items():
            check_positive_int(f"rank_pattern[{k!r}]", n)
        for k, a in dict(self.alpha_pattern).items():
            check_finite_number(f"alpha_pattern[{k!r}]", a, positive=True)
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))

    @property
    def method(self) -> str:
        return "lora_fa"

    @classmethod
    def required_keys(cls) -> tuple[str, ...]:
        return ("r", "target_modules")

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / r**0.5 if self.use_rslora else alpha / r


def _keep_mask(like: Tensor, p: float, seed: int) -> Tensor:
    """Dropout's scaled keep-mask (values 0 or 1/(1-p)) in ``like``'s dtype, a pure function of
    ``seed`` and ``like``'s shape and device."""
    g = torch.Generator(device=like.device)
    g.manual_seed(seed)
    # Note: drawn in fp32 whatever ``like``'s dtype: forward draws it for x (bf16, say) and
    # backward for ∂x in the adapter's dtype (fp32), and both must get the same mask.
    keep = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    return keep.bernoulli_(1.0 - p, generator=g).to(like.dtype).div_(1.0 - p)


def _scaled(keep: Tensor, p: float, like: Tensor) -> Tensor:
    """A boolean keep-mask as dropout's scaled mask (0 or 1/(1-p)) in ``like``'s dtype."""
    return keep.to(like.dtype) / (1.0 - p)


class _FrozenABranch(torch.autograd.Function):
    """``s · B (A D(x))`` for a frozen A: saves z = A D(x) (r-wide) and, for dropout, a seed from
    which backward draws the mask again (or, when compiled, the boolean ``keep`` mask itself)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: float,
        p: float,
        seed: int,
        keep: Tensor | None,
    ) -> Tensor:
        if keep is not None:
            xd = x * _scaled(keep, p, x)
        else:
            xd = x * _keep_mask(x, p, seed) if p > 0 else x
        z = F.linear(xd.to(lora_A.dtype), lora_A)  # (..., r)
        ctx.save_for_backward(z, lora_A, lora_B, keep)
        c: Any = ctx
        c.scaling, c.p, c.seed, c.x_dtype = scaling, p, seed, x.dtype
        return F.linear(z * scaling, lora_B)  # (..., out)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        z, lora_A, lora_B, keep = ctx.saved_tensors
        grad_x = grad_B = None
        if ctx.needs_input_grad[2]:
            g2 = g.reshape(-1, g.shape[-1])  # (N, out)
            z2 = z.reshape(-1, z.shape[-1]).to(g2.dtype)  # (N, r)
            grad_B = (g2.T @ z2).mul_(ctx.scaling).to(lora_B.dtype)  # (out, r)
        if ctx.needs_input_grad[0]:
            gz = (g @ lora_B.to(g.dtype)) * ctx.scaling  # (..., out) @ (out, r) -> (..., r)
            grad_x = gz @ lora_A.to(gz.dtype)  # (..., r) @ (r, in) -> (..., in)
            if keep is not None:
                grad_x = grad_x * _scaled(keep, ctx.p, grad_x)
            elif ctx.p > 0:
                grad_x = grad_x * _keep_mask(grad_x, ctx.p, ctx.seed)
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, None, grad_B, None, None, None, None


class LoraFALayer(LoraLayer):
    """LoRA with ``lora_A`` frozen; the branch saves only the rank-r projection for backward."""

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
        super().__init__(base, r=r, alpha=alpha, scaling=scaling, dropout=0.0, init=init)
        self.lora_dropout = dropout
        self.lora_A.requires_grad_(False)

    def trainable_names(self) -> tuple[str, ...]:
        return ("lora_B",)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        warn_if_unattached(self, UNATTACHED)
        out: Tensor = self.base(x, *args, **kwargs)
        if self.disabled or self.merged:
            return out
        p = self.lora_dropout if self.training else 0.0
        if self.lora_A.requires_grad:
            # Note: A unfrozen by hand trains as plain LoRA (saving x).
            branch: Tensor = self.update(F.dropout(x, p) if p > 0 else x)
        elif p > 0 and torch.compiler.is_compiling():
            # Note: a compiled graph cannot hold a torch.Generator nor read a seed with .item():
            # the mask comes from the graph's own RNG and is saved (one byte per input element).
            keep = torch.rand_like(x, dtype=torch.float32) >= p
            branch = _FrozenABranch.apply(  # type: ignore[no-untyped-call]
                x, self.lora_A, self.lora_B, self.scaling, p, 0, keep
            )
        elif p > 0:
            # Note: the seed comes from torch's global CPU generator, so torch.manual_seed makes
            # the masks reproducible, and drawing it never synchronises a GPU. With or without
            # grad the mask is the same function of that seed: reentrant checkpointing runs the
            # forward first under no_grad, then again with grad from the same RNG state, and
            # both must drop the same inputs (F.dropout in one of them would draw another mask).
            seed = int(torch.randint(0, 2**62, ()).item())
            if torch.is_grad_enabled():
                branch = _FrozenABranch.apply(  # type: ignore[no-untyped-call]
                    x, self.lora_A, self.lora_B, self.scaling, p, seed, None
                )
            else:
                branch = self.update(x * _keep_mask(x, p, seed))
        elif torch.is_grad_enabled():
            branch = _FrozenABranch.apply(  # type: ignore[no-untyped-call]
                x, self.lora_A, self.lora_B, self.scaling, 0.0, 0, None
            )
        else:
            branch = self.update(x)  # inference saves nothing
        return out + branch.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, A frozen, dropout={self.lora_dropout:g}"


@torch.no_grad()
def corrected_grad(grad_B: Tensor, lora_A: Tensor, scaling: float) -> Tensor:
    """LoRA-FA v2's B-gradient ``g_B (A Aᵀ + δI)⁺ / s²`` in fp32, returned in ``grad_B``'s dtype."""
    a = lora_A.float()
    gram = a @ a.T  # (r, in) @ (in, r) -> (r, r)
    inv = torch.linalg.pinv(gram + RIDGE * torch.eye(a.shape[0], device=a.device))  # (r, r)
    g: Tensor = (grad_B.float() @ inv) / scaling**2  # (out, r) @ (r, r)
    return g.to(grad_B.dtype)


UNATTACHED = unattached_message(
    "LoRA-FA (gradient_correction=True)", "B's gradient is not corrected (plain LoRA-FA)"
)


class GradientCorrection:
    """TrainingHook: before each real optimizer step, replace every ``lora_B.grad`` by
    :func:`corrected_grad` (after accumulation and clipping, never on a skipped step)."""

    def __init__(self, layers: Sequence[LoraFALayer]) -> None:
        self.layers = list(layers)

    def on_attach(self) -> None:
        mark_attached(self.layers)

    @torch.no_grad()
    def before_step(self) -> None:
        for layer in self.layers:
            g = layer.lora_B.grad
            if g is not None:
                g.copy_(corrected_grad(g, layer.lora_A, layer.scaling))

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def check(model: nn.Module, config: Any, targets: Sequence[tuple[str, nn.Module]]) -> None:
    emb = [name for name, m in targets if layer_kind(m) == EMBEDDING]
    if emb:
        raise ValueError(
            f"LoRA-FA cannot adapt the embedding {emb[0]!r}: its input is token ids, so there is "
            "no activation to save, and an embedding's A starts at zero, so a frozen A never "
            "learns. "
            "Leave embeddings out of target_modules (or use LoraConfig for them)."
        )


def make_layer(base: nn.Module, config: AdapterConfig, spec: LayerSpec) -> LoraFALayer:
    assert isinstance(config, LoraFAConfig)
    return upcast_adapter(LoraFALayer(base, **layer_kwargs(config, spec)), config)


def make_hook(
    model: nn.Module, config: Any, layers: Sequence[tuple[str, Adapter]]
) -> GradientCorrection | None:
    if not config.gradient_correction:
        return None
    hook = GradientCorrection([a for _, a in layers if isinstance(a, LoraFALayer)])
    expect_hook(hook.layers)
    return hook


METHOD = Method(
    name="lora_fa",
    config_cls=LoraFAConfig,
    make_layer=make_layer,
    reads=lambda d: d.get("peft_type") == "LORA" and d.get("peftkit_method") == "lora_fa",
    make_hook=make_hook,
    check=check,
)
