"""VeRA: vector-based random matrix adaptation (Kopiczko, Blankevoort, Asano, ICLR 2024,
https://arxiv.org/abs/2310.11454).

    y = x W₀ᵀ + b + λ_b ⊙ ((λ_d ⊙ (D(x) A_sᵀ)) B_sᵀ),   ΔW = Λ_b B_s Λ_d A_s   (no α scaling)

One pair of frozen random matrices A ∈ R^{r×in_max}, B ∈ R^{out_max×r} is shared by every adapted
layer (one holder module, ``model.peftkit_shared``); each layer uses the leading slices
A_s = A[:, :in] and B_s = B[:out, :] and trains only λ_d ∈ R^r (init ``d_initial``) and
λ_b ∈ R^out (init 0, so the adapted model starts equal to the base).

The projections are drawn as PEFT draws them, so a file that carries only the vectors and
``projection_prng_key`` (``save_projection=False``) loads to the same model: one CPU generator
seeded with the key, A first, then B, each uniform(±√(6 / fan_in)) with fan_in = its columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, check_finite_number, check_positive_int, check_probability
from ..core import (
    EMBEDDING,
    Adapter,
    base_device,
    base_dtype,
    layer_kind,
    layer_shape,
    model_state,
)
from ..precision import upcast_adapter
from .registry import LayerSpec, Method


@dataclass(frozen=True, kw_only=True)
class VeraConfig(AdapterConfig):
    """VeRA. ``r``: rank of the shared projections (PEFT's default 256; the paper uses up to
    1024); ``projection_prng_key``: seed of the projections; ``save_projection``: write A and B
    into the file (True, safest) or regenerate them from the key on load; ``vera_dropout``:
    dropout on the branch input; ``d_initial``: initial value of every λ_d entry;
    ``init_weights``: False starts λ_b = 1 and λ_d ~ N(0, 1) (not a no-op; for tests, as PEFT)."""

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True

    peft_type: ClassVar[str | None] = "VERA"
    unsupported_keys: ClassVar[dict[str, Any]] = {"bias": "none"}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        key = self.projection_prng_key
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ValueError(
                f"projection_prng_key must be a non-negative integer seed, got {key!r}; "
                "e.g. projection_prng_key=0"
            )
        check_probability("vera_dropout", self.vera_dropout)
        check_finite_number("d_initial", self.d_initial)
        for name in ("save_projection", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def method(self) -> str:
        return "vera"

    @classmethod
    def required_keys(cls) -> tuple[str, ...]:
        return ("r", "target_modules")


def projections(r: int, in_max: int, out_max: int, key: int) -> tuple[Tensor, Tensor]:
    """PEFT's shared projections for a seed: ``A (r, in_max)`` then ``B (out_max, r)``, fp32, CPU.

    Each is kaiming-uniform with gain √2 on its own fan_in (its second dimension): bound
    √3 · √2 / √fan_in. Drawn in this order from one generator, they equal PEFT's bit for bit."""
    g = torch.Generator(device="cpu").manual_seed(key)
    a_bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(in_max)
    vera_a = torch.empty(r, in_max).uniform_(-a_bound, a_bound, generator=g)  # (r, in_max)
    b_bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(r)
    vera_b = torch.empty(out_max, r).uniform_(-b_bound, b_bound, generator=g)  # (out_max, r)
    return vera_a, vera_b


class VeraProjections(nn.Module):
    """The frozen pair shared by all layers, held once so ``model.to(...)`` keeps it shared.

    Buffers are persistent only with ``save_projection`` (as PEFT's), and only then part of the
    adapter file, under PEFT's model-level keys ``base_model.vera_A``/``base_model.vera_B``."""

    def __init__(
        self,
        config: VeraConfig,
        in_max: int,
        out_max: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.save_projection = config.save_projection
        self.projection_prng_key = config.projection_prng_key
        vera_a, vera_b = projections(config.r, in_max, out_max, config.projection_prng_key)
        self.register_buffer(
            "vera_A", vera_a.to(device=device, dtype=dtype), persistent=config.save_projection
        )
        self.register_buffer(
            "vera_B", vera_b.to(device=device, dtype=dtype), persistent=config.save_projection
        )

    vera_A: Tensor
    vera_B: Tensor

    def peft_keys(self) -> dict[str, str]:
        """Local buffer name → full PEFT key; empty when the file regenerates them from the key."""
        if not self.save_projection:
            return {}
        return {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}

    def extra_repr(self) -> str:
        return (
            f"A={tuple(self.vera_A.shape)}, B={tuple(self.vera_B.shape)}, "
            f"key={self.projection_prng_key}, saved={self.save_projection}"
        )


class VeraLayer(Adapter):
    """``base(x) + λ_b ⊙ ((λ_d ⊙ (D(x) A_sᵀ)) B_sᵀ)`` with A, B read from the shared holder."""

    roles: ClassVar[dict[str, str]] = {"lambda_b": "lambda_b", "lambda_d": "lambda_d"}

    def __init__(
        self,
        base: nn.Module,
        shared: VeraProjections,
        *,
        r: int,
        dropout: float = 0.0,
        d_initial: float = 0.1,
        init_weights: bool = True,
    ) -> None:
        super().__init__(base, dropout=dropout)
        if (
            shared.vera_A.shape[0] != r
            or shared.vera_A.shape[1] < self.in_features
            or shared.vera_B.shape[0] < self.out_features
        ):
            raise ValueError(
                f"shared projections A {tuple(shared.vera_A.shape)} / B "
                f"{tuple(shared.vera_B.shape)} cannot serve a layer of in={self.in_features}, "
                f"out={self.out_features}, r={r}; build them from all targets (adapt does this)"
            )
        # Note: a plain attribute, not a submodule: the holder is registered once on the model,
        # so ``.to()`` converts it once and every layer keeps reading the same tensors.
        object.__setattr__(self, "shared", shared)
        self.r = r
        kw: dict[str, Any] = {"device": base_device(base), "dtype": base_dtype(base)}
        self.lambda_b = nn.Parameter(torch.empty(self.out_features, **kw))
        # Note: PEFT draws λ_d from the global RNG before overwriting it; drawing the same
        # numbers (on the CPU) keeps whole training runs replicable against PEFT.
        self.lambda_d = nn.Parameter(torch.randn(r).to(**kw))
        with torch.no_grad():
            if init_weights:
                self.lambda_d.fill_(d_initial)
                self.lambda_b.zero_()
            else:
                self.lambda_b.fill_(1.0)

    shared: VeraProjections

    def _sliced(self) -> tuple[Tensor, Tensor]:
        a = self.shared.vera_A[:, : self.in_features]  # (r, in)
        b = self.shared.vera_B[: self.out_features, :]  # (out, r)
        return a, b

    def update(self, x: Tensor) -> Tensor:
        a, b = self._sliced()
        x = x.to(self.lambda_d.dtype)
        h = F.linear(x, a.to(x.dtype)) * self.lambda_d  # (..., r)
        return F.linear(h, b.to(x.dtype)) * self.lambda_b  # (..., out)

    def factors(self) -> tuple[Tensor, Tensor] | None:
        a, b = self._sliced()
        dt = self.lambda_d.dtype
        return self.lambda_d[:, None] * a.to(dt), self.lambda_b[:, None] * b.to(dt)

    def delta_weight(self) -> Tensor:
        a, b = self._sliced()
        # (out, r) @ (r, in) -> (out, in)
        return (self.lambda_b[:, None] * b.to(self.lambda_b.dtype)) @ (
            self.lambda_d[:, None] * a.to(self.lambda_d.dtype)
        )

    def lora_factors(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        if rank is not None and rank != self.r:
            raise ValueError(
                f"a VeRA adapter of rank {self.r} is exactly a rank-{self.r} LoRA; export it "
                f"without rank= (got rank={rank})"
            )
        a, b = self._sliced()
        lora_a = (self.lambda_d[:, None] * a.to(self.lambda_d.dtype)).detach()  # (r, in)
        lora_b = (self.lambda_b[:, None] * b.to(self.lambda_b.dtype)).detach()  # (out, r)
        return lora_a, lora_b

    def peft_keys(self) -> dict[str, str]:
        return {"lambda_b": "vera_lambda_b", "lambda_d": "vera_lambda_d"}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"


def check(model: nn.Module, config: VeraConfig, targets: Sequence[tuple[str, nn.Module]]) -> None:
    emb = [name for name, m in targets if layer_kind(m) == EMBEDDING]
    if emb:
        raise ValueError(
            f"VeRA cannot adapt embedding layers ({emb[:3]}); PEFT's VeRA does not either. "
            "Remove them from target_modules, or use LoraConfig for embeddings."
        )


def prepare(
    model: nn.Module, config: VeraConfig, targets: Sequence[tuple[str, nn.Module]]
) -> VeraProjections:
    """The shared projections, sized to the per-dimension maximum over all targets (as PEFT)."""
    shapes = [layer_shape(m) for _, m in targets]
    in_max = max(i for i, _ in shapes)
    out_max = max(o for _, o in shapes)
    first = targets[0][1]
    return VeraProjections(
        config, in_max, out_max, device=base_device(first), dtype=base_dtype(first)
    )


def make_layer(base: nn.Module, config: AdapterConfig, spec: LayerSpec) -> VeraLayer:
    assert isinstance(config, VeraConfig) and isinstance(spec.shared, VeraProjections)
    layer = VeraLayer(
        base,
        spec.shared,
        r=config.r,
        dropout=config.vera_dropout,
        d_initial=config.d_initial,
        init_weights=config.init_weights,
    )
    return upcast_adapter(layer, config)


def on_load(model: nn.Module, d: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``save_projection=False`` file may still carry projections: PEFT ignores them and
    regenerates from the key. Accept them only if they are what the key regenerates."""
    shared = model_state(model).shared
    if not isinstance(shared, VeraProjections) or shared.save_projection:
        return tensors
    out = dict(tensors)
    for local in ("vera_A", "vera_B"):
        t = out.pop(f"base_model.{local}", None)
        mine = getattr(shared, local)
        if t is not None and (t.shape != mine.shape or not torch.equal(t.to(mine), mine)):
            raise ValueError(
                f"the file has save_projection=false but carries base_model.{local} that differs "
                f"from the projection regenerated from projection_prng_key="
                f"{shared.projection_prng_key}; set save_projection=true in its config to use it"
            )
    return out


METHOD = Method(
    name="vera",
    config_cls=VeraConfig,
    make_layer=make_layer,
    reads=lambda d: d.get("peft_type") == "VERA",
    prepare=prepare,
    check=check,
    on_load=on_load,
)
