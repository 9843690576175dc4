"""Delta-LoRA: LoRA whose product change also updates the frozen weight (Zi et al., 2023,
https://arxiv.org/abs/2309.02411).

    h = W_t x + s · B_t A_t x,     s = α/r (rsLoRA: α/√r)
    after every optimizer step t past the warm-up:  W_{t+1} = W_t + λ s (B_{t+1}A_{t+1} − B_t A_t)

W gets no gradient and no optimizer state: :class:`DeltaUpdate` (a TrainingHook, run by
``peftkit.attach(optimizer, model)`` once per real optimizer step and never on a step a
GradScaler skips) copies A and B before the step and adds the product difference after it.
``warmup_steps = K`` optimizer steps leave W alone; every later step moves it (Algorithm 1's
0-based ``t > K`` starts one step later). No dropout: the update stands in for W's gradient only
if the branch sees the same input as W, so ``lora_dropout`` exists for PEFT-style configs and must
be 0.

The sum telescopes: with (A_K, B_K) the factors at the end of the warm-up (kept as buffers),

    W_t = W_0 + λ s (B_t A_t − B_K A_K)
    model = W_0 + (1+λ) s B_t A_t − λ s B_K A_K           (a rank-2r LoRA on the base)

so ``export_lora`` writes the exact rank-2r PEFT LoRA ``[A_t; A_K]``, ``[(1+λ)s B_t, −λs B_K]``;
``unload`` and ``disable_adapters`` recover W_0 as ``W_t − λ s (B_t A_t − B_K A_K)`` (to
floating-point tolerance, not bitwise: W_t was accumulated step by step). Saved files hold
``lora_A = [A_t; A_K]`` (2r × in), ``lora_B = [B_t, B_K]`` (out × 2r), unscaled so a resumed run is
exact, and ``delta_active``; loading rebuilds W_t on the base. PEFT refuses these files (its ``r``
says r), deliberately: the trained model is not ``base + s B_t A_t``; ``export_lora`` is the PEFT
form. The warm-up step count saves with the optimizer's state.

Note: an NF4 base cannot absorb the updates (refused at ``adapt``). A 16-bit base rounds each
step's update to its precision (updates below half an ulp are lost), so the closed form holds to
that precision only: keep the adapted weights in fp32 for exact bookkeeping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, check_finite_number, check_positive_int
from ..core import EMBEDDING, NF4, Adapter, adapters, add_to_base_weight, layer_kind
from ..precision import upcast_adapter
from .attached import expect_hook, mark_attached, unattached_message, warn_if_unattached
from .lora import LORA_UNSUPPORTED, LoraLayer
from .registry import LayerSpec, Method

PREFIX = "base_model.model."


@dataclass(frozen=True, kw_only=True)
class DeltaLoraConfig(AdapterConfig):
    """Delta-LoRA. ``r``, ``lora_alpha``, ``use_rslora``, ``init_lora_weights``: as LoRA;
    ``delta_lambda``: λ, the update ratio (paper: 2); ``warmup_steps``: K, optimizer steps before W
    starts following (paper: 500); ``lora_dropout``: must be 0 (the method removes dropout)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    delta_lambda: float = 2.0
    warmup_steps: int = 500

    unsupported_keys: ClassVar[Mapping[str, Any]] = {**LORA_UNSUPPORTED, "use_dora": False}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_finite_number("lora_alpha", self.lora_alpha, positive=True)
        check_finite_number("lora_dropout", self.lora_dropout)
        if self.lora_dropout != 0:
            raise ValueError(
                f"lora_dropout={self.lora_dropout!r}: Delta-LoRA uses no dropout (the update of W "
                "stands in for W's gradient only if the branch sees W's input); set lora_dropout=0"
            )
        check_finite_number("delta_lambda", self.delta_lambda)
        if self.delta_lambda < 0:
            raise ValueError(f"delta_lambda must be >= 0, got {self.delta_lambda!r}; paper: 2")
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or (self.warmup_steps < 0)
        ):
            raise ValueError(
                f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}; paper: 500"
            )
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True, "
                "'gaussian' or False"
            )
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {self.use_rslora!r}")

    @property
    def method(self) -> str:
        return "delta_lora"

    @classmethod
    def required_keys(cls) -> tuple[str, ...]:
        return ("r", "target_modules")

    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r


class DeltaLoraLayer(LoraLayer):
    """LoRA whose base weight follows the product: buffers ``lora_A_K``/``lora_B_K`` hold the
    factors at the end of the warm-up, ``delta_active`` whether W has moved since."""

    lora_A_K: Tensor
    lora_B_K: Tensor
    delta_active: Tensor

    def __init__(
        self,
        base: nn.Module,
        *,
        r: int,
        alpha: float,
        scaling: float,
        delta_lambda: float,
        init: bool | str = True,
    ) -> None:
        super().__init__(base, r=r, alpha=alpha, scaling=scaling, dropout=0.0, init=init)
        self.delta_lambda = delta_lambda
        self.register_buffer("lora_A_K", torch.zeros_like(self.lora_A.detach()))
        self.register_buffer("lora_B_K", torch.zeros_like(self.lora_B.detach()))
        self.register_buffer("delta_active", torch.zeros((), dtype=torch.bool))

    # -- W_t − W_0 ---------------------------------------------------------------------------------
    def _pair(self, a: Tensor, b: Tensor, a_k: Tensor, b_k: Tensor) -> tuple[Tensor, Tensor]:
        """Factors ``(A₂, B₂)`` of ``λ s (b a − b_k a_k)``: ``B₂ A₂`` is that difference."""
        a2 = torch.cat([a, a_k]).detach()  # (2r, in)
        b2 = torch.cat([b, -b_k], dim=1).detach() * (self.delta_lambda * self.scaling)  # (out, 2r)
        return a2, b2

    def w_delta(self) -> Tensor:
        """``W_t − W_0 = λ s (B_t A_t − B_K A_K)`` as a dense ``(out, in)`` tensor (zero before
        the warm-up ends)."""
        if not bool(self.delta_active):
            return torch.zeros(
                self.out_features,
                self.in_features,
                dtype=self.lora_A.dtype,
                device=self.lora_A.device,
            )
        a2, b2 = self._pair(self.lora_A, self.lora_B, self.lora_A_K, self.lora_B_K)
        return b2 @ a2  # (out, 2r) @ (2r, in) -> (out, in)

    @torch.no_grad()
    def _add_to_w(self, delta: Tensor) -> None:
        if self.weight_tied and "_delta_original" not in self.__dict__:
            # Note: a weight tied to another module (GPT-2's wte and lm_head) must not move under
            # that module: the first update gives this layer its own copy; unload puts the
            # original back (exactly W_0). weight_tied stays set so merges untie as usual.
            w = self.base.weight
            assert isinstance(w, nn.Parameter)
            self.__dict__["_delta_original"] = w  # kept out of parameters() and state_dict()
            self.base.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        add_to_base_weight(self.base, delta)

    @torch.no_grad()
    def follow(self, a_prev: Tensor, b_prev: Tensor) -> None:
        """After an optimizer step: ``W += λ s (B A − b_prev a_prev)``; the first call records
        ``(a_prev, b_prev)`` as the warm-up's end ``(A_K, B_K)``."""
        if not bool(self.delta_active):
            self.lora_A_K.copy_(a_prev)
            self.lora_B_K.copy_(b_prev)
            self.delta_active.fill_(True)
        a2, b2 = self._pair(self.lora_A, self.lora_B, a_prev, b_prev)
        self._add_to_w(b2 @ a2)  # (out, 2r) @ (2r, in) -> (out, in)

    @torch.no_grad()
    def restore_base(self) -> None:
        """``W ← W_0`` and back to the warm-up state (``unload`` calls this)."""
        original = self.__dict__.pop("_delta_original", None)
        if original is not None:
            self.base.weight = original
        elif bool(self.delta_active):
            add_to_base_weight(self.base, -self.w_delta())
        self.delta_active.fill_(False)
        self.lora_A_K.zero_()
        self.lora_B_K.zero_()

    def on_unload(self) -> None:
        self.restore_base()

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        warn_if_unattached(self, UNATTACHED)
        out: Tensor = self.base(x, *args, **kwargs)
        if self.merged:
            return out
        if self.disabled:
            if not bool(self.delta_active):
                return out
            # W_0 x = W_t x − λ s (B_t A_t − B_K A_K) x, without forming W_0 (no gradient to A, B)
            a2, b2 = self._pair(self.lora_A, self.lora_B, self.lora_A_K, self.lora_B_K)
            if self.kind == EMBEDDING:
                e = self.base
                assert isinstance(e, nn.Embedding)
                h = F.embedding(x, a2.T, e.padding_idx)  # (..., 2r)
            else:
                h = F.linear(x.to(a2.dtype), a2)  # (..., 2r)
            return out - F.linear(h, b2).to(out.dtype)  # (..., out)
        return out + self.update(x).to(out.dtype)

    # -- files -----------------------------------------------------------------------------------
    def lora_factors(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        """Exact factors of the whole change from W_0: rank r during the warm-up, then rank 2r
        ``[A_t; A_K]``, ``[(1+λ) s B_t, −λ s B_K]``."""
        if not bool(self.delta_active):
            return super().lora_factors(rank)
        if rank is not None and rank != 2 * self.r:
            raise ValueError(
                f"a trained Delta-LoRA of rank {self.r} is exactly a rank-{2 * self.r} LoRA; "
                f"export it without rank= (got rank={rank})"
            )
        s, lam = self.scaling, self.delta_lambda
        a = torch.cat([self.lora_A, self.lora_A_K]).detach()  # (2r, in)
        b = torch.cat([self.lora_B * ((1 + lam) * s), self.lora_B_K * (-lam * s)], dim=1)
        return a, b.detach()  # (out, 2r)

    def peft_keys(self) -> dict[str, str]:
        return {**super().peft_keys(), "delta_active": "delta_active"}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, delta_lambda={self.delta_lambda:g}"


UNATTACHED = unattached_message(
    "Delta-LoRA", "W does not follow the change of s·BA, so it trains as a plain LoRA"
)


class DeltaUpdate:
    """TrainingHook: W follows the change of ``s·BA`` after every optimizer step past the
    warm-up. Its state (optimizer steps seen) saves with the optimizer."""

    def __init__(self, layers: Sequence[DeltaLoraLayer], warmup_steps: int) -> None:
        self.layers = list(layers)
        self.warmup_steps = warmup_steps
        self.steps = 0
        self._prev: list[tuple[Tensor, Tensor]] | None = None

    def on_attach(self) -> None:
        mark_attached(self.layers)

    def _following(self) -> bool:
        if self.steps >= self.warmup_steps or not self.layers:
            return True
        # Note: a loaded adapter may be past its warm-up while this counter is not (a fresh
        # optimizer); once W has moved it must follow every step, or the closed form breaks.
        return bool(torch.stack([a.delta_active for a in self.layers]).any())

    @torch.no_grad()
    def before_step(self) -> None:
        self._prev = None
        if self._following():
            self._prev = [
                (a.lora_A.detach().clone(), a.lora_B.detach().clone()) for a in self.layers
            ]

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps += 1
        prev, self._prev = self._prev, None
        if prev is None:
            return
        for layer, (a, b) in zip(self.layers, prev, strict=True):
            layer.follow(a, b)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


def check(model: nn.Module, config: Any, targets: Sequence[tuple[str, nn.Module]]) -> None:
    nf4 = [name for name, m in targets if layer_kind(m) == NF4]
    if nf4:
        raise ValueError(
            f"Delta-LoRA cannot adapt {nf4[0]!r}: it writes its update into the base weight W, and "
            "an NF4 (4-bit quantised) base cannot absorb small updates. Use Delta-LoRA on the "
            "unquantised model, or LoraConfig on the NF4 model (QLoRA)."
        )


def _delta_layers(model: nn.Module) -> list[tuple[str, DeltaLoraLayer]]:
    return [(n, a) for n, a in adapters(model) if isinstance(a, DeltaLoraLayer)]


def on_save(model: nn.Module, d: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    for name, layer in _delta_layers(model):
        keys = layer.peft_keys()
        ka, kb = f"{PREFIX}{name}.{keys['lora_A']}", f"{PREFIX}{name}.{keys['lora_B']}"
        tensors[ka] = torch.cat([layer.lora_A.detach(), layer.lora_A_K])  # (2r, in)
        tensors[kb] = torch.cat([layer.lora_B.detach(), layer.lora_B_K], dim=1)  # (out, 2r)


@torch.no_grad()
def on_load(model: nn.Module, d: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Split ``[A_t; A_K]`` / ``[B_t, B_K]``, load them and the flag into each layer and rebuild
    ``W_t = W_0 + λ s (B_t A_t − B_K A_K)`` on the base. All shapes are checked first, so a bad
    file changes nothing."""
    out = dict(tensors)
    plan = []
    for name, layer in _delta_layers(model):
        keys = layer.peft_keys()
        ka, kb, kf = (f"{PREFIX}{name}.{keys[k]}" for k in ("lora_A", "lora_B", "delta_active"))
        if ka not in tensors or kb not in tensors or kf not in tensors:
            continue  # the strict loader reports the missing key
        a, b, r = tensors[ka], tensors[kb], layer.r
        want_a, want_b = (2 * r, layer.in_features), (layer.out_features, 2 * r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b or tensors[kf].numel() != 1:
            raise ValueError(
                f"{name}: a Delta-LoRA file holds lora_A {want_a} = [A_t; A_K] and lora_B "
                f"{want_b} = [B_t, B_K]; got {tuple(a.shape)} and {tuple(b.shape)}. Is it a "
                "Delta-LoRA adapter of this config?"
            )
        out[ka], out[kb] = a[:r], b[:, :r]
        plan.append((layer, a, b, bool(tensors[kf])))
    for layer, a, b, active in plan:
        r = layer.r
        layer.restore_base()
        layer.lora_A.copy_(a[:r])
        layer.lora_B.copy_(b[:, :r])
        if active:
            layer.lora_A_K.copy_(a[r:])
            layer.lora_B_K.copy_(b[:, r:])
            layer.delta_active.fill_(True)
            layer._add_to_w(layer.w_delta())
    return out


def make_layer(base: nn.Module, config: AdapterConfig, spec: LayerSpec) -> DeltaLoraLayer:
    assert isinstance(config, DeltaLoraConfig)
    layer = DeltaLoraLayer(
        base,
        r=config.r,
        alpha=float(config.lora_alpha),
        scaling=config.scaling(),
        delta_lambda=float(config.delta_lambda),
        init=config.init_lora_weights,
    )
    return upcast_adapter(layer, config)


def make_hook(model: nn.Module, config: Any, layers: Sequence[tuple[str, Adapter]]) -> DeltaUpdate:
    hook = DeltaUpdate([a for _, a in layers if isinstance(a, DeltaLoraLayer)], config.warmup_steps)
    expect_hook(hook.layers)
    return hook


METHOD = Method(
    name="delta_lora",
    config_cls=DeltaLoraConfig,
    make_layer=make_layer,
    reads=lambda d: d.get("peft_type") == "LORA" and d.get("peftkit_method") == "delta_lora",
    make_hook=make_hook,
    check=check,
    on_save=on_save,
    on_load=on_load,
    mutates_base=True,
)
