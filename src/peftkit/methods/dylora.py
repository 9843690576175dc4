"""DyLoRA (Valipour et al., EACL 2023, https://arxiv.org/abs/2210.07558): one LoRA of rank r
trained so that every truncation to a rank b ∈ {r_min, …, r} works, with no retraining.

    ΔW_b = (α / b) · B[:, :b] A[:b, :]
    y    = x W₀ᵀ + b₀ + (α / b) · (D(x) A[:b]ᵀ) B[:, :b]ᵀ,   A ∈ R^{r×in}, B ∈ R^{out×r}

Training: before each optimizer step's forward passes, one b ~ Uniform{r_min, …, r} is drawn from a
seeded generator held by the method's training hook, and every layer uses it (the official code's
global ``set_rank``). ``after_step`` draws the next b, so all micro-batches of one optimizer step
share one b, under a plain loop with gradient accumulation and under the HF Trainer alike. The
first b is drawn from the seed at ``adapt`` and applied at ``peftkit.attach``. ``frozen=True``
(the official training mode) lets gradient reach only the b-th component: the rows A[:b-1] and
columns B[:, :b-1] enter the forward detached.

The rank is a mask on the rank-r activation, never a slice, so shapes stay static (no recompiles,
CUDA graphs keep their buffers). Evaluation uses the rank chosen by :func:`set_rank` (default r);
``export_lora(model, dir, rank=b)`` writes a plain PEFT LoRA of rank b: A[:b], B[:, :b]·α/b.
Initialisation is LoRA's (A kaiming-uniform a = √5, B = 0; an embedding's A = 0, B ~ N(0, 1)).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, check_finite_number, check_positive_int, check_probability
from ..core import EMBEDDING, Adapter, adapters, base_device, base_dtype
from ..precision import upcast_adapter
from .lora import LORA_UNSUPPORTED
from .registry import LayerSpec, Method

UNATTACHED = (
    "a DyLoRA layer ran a training forward before peftkit.attach(optimizer, model): until then it "
    "trains at full rank r, with no rank draw. Attach the optimizer (or use "
    "peftkit.integrations.hf.PeftkitCallback) before training."
)


@dataclass(frozen=True, kw_only=True)
class DyLoraConfig(AdapterConfig):
    """DyLoRA. ``r``: the maximal rank; ``r_min``: the smallest rank drawn; ``lora_alpha``: α in
    the scale α/b; ``frozen``: train only the b-th component each step (the official code's mode);
    ``seed``: seeds the rank draw (every process draws the same sequence)."""

    r: int = 8
    r_min: int = 1
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    frozen: bool = False
    seed: int = 0

    peft_type: ClassVar[str | None] = None
    unsupported_keys: ClassVar[Mapping[str, Any]] = {
        **LORA_UNSUPPORTED,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_positive_int("r_min", self.r_min)
        if self.r_min > self.r:
            raise ValueError(f"r_min={self.r_min} exceeds r={self.r}; use 1 <= r_min <= r")
        check_finite_number("lora_alpha", self.lora_alpha, positive=True)
        check_probability("lora_dropout", self.lora_dropout)
        if not isinstance(self.frozen, bool):
            raise ValueError(f"frozen must be True or False, got {self.frozen!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}; e.g. seed=0")

    @property
    def method(self) -> str:
        return "dylora"

    @classmethod
    def required_keys(cls) -> tuple[str, ...]:
        return ("r", "target_modules")


class DyLoraLayer(Adapter):
    """``base(x) + (D(x) Aᵀ ⊙ κ) Bᵀ`` with κ = α/b on the first b components and 0 after them."""

    roles: ClassVar[dict[str, str]] = {"lora_A": "A", "lora_B": "B"}
    train_coef: Tensor  # (r,) α/b on the first b components: the training rank
    train_grad: Tensor  # (r,) one-hot at b - 1: the component frozen mode trains
    eval_coef: Tensor  # (r,) the same for the evaluation rank (set_rank)

    def __init__(
        self, base: nn.Module, *, r: int, alpha: float, dropout: float, frozen: bool
    ) -> None:
        super().__init__(base, dropout=0.0 if isinstance(base, nn.Embedding) else dropout)
        self.r, self.lora_alpha, self.frozen = r, alpha, frozen
        kw: dict[str, Any] = {"device": base_device(base), "dtype": base_dtype(base)}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        # Note: rank state lives in buffers updated in place, so a compiled or graph-captured
        # forward sees a new rank without retracing; they are not persistent (not in files).
        self.register_buffer("train_coef", torch.empty(r, **kw), persistent=False)
        self.register_buffer("train_grad", torch.empty(r, **kw), persistent=False)
        self.register_buffer("eval_coef", torch.empty(r, **kw), persistent=False)
        self.train_rank = self.eval_rank = r
        self.hooked = False  # set once the training hook drives the rank
        self._set(r, train=True)
        self._set(r, train=False)
        with torch.no_grad():
            if self.kind == EMBEDDING:
                nn.init.zeros_(self.lora_A)
                nn.init.normal_(self.lora_B)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)

    def check_rank(self, b: int) -> int:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.r:
            raise ValueError(f"rank {b!r} is outside 1..{self.r} (this adapter's r); pick one")
        return b

    @torch.no_grad()
    def _set(self, b: int, *, train: bool) -> None:
        coef = torch.zeros(self.r, dtype=torch.float64)
        coef[:b] = self.lora_alpha / b
        if train:
            self.train_rank = b
            self.train_coef.copy_(coef)
            grad = torch.zeros(self.r)
            grad[b - 1] = 1.0  # frozen mode: only the b-th component learns
            self.train_grad.copy_(grad)
        else:
            self.eval_rank = b
            self.eval_coef.copy_(coef)

    def set_train_rank(self, b: int) -> None:
        """Called by the training hook: the rank every training forward uses until the next step."""
        self.hooked = True
        self._set(self.check_rank(b), train=True)

    def set_eval_rank(self, b: int) -> None:
        if self.merged:
            raise ValueError("cannot change a merged DyLoRA layer's rank; unmerge(model) first")
        self._set(self.check_rank(b), train=False)

    def update(self, x: Tensor) -> Tensor:
        a: Tensor = self.lora_A
        b: Tensor = self.lora_B
        if self.training:
            if not self.hooked and torch.is_grad_enabled():
                warnings.warn(UNATTACHED, stacklevel=2)
            coef = self.train_coef
            if self.frozen and self.hooked:
                g = self.train_grad.to(a.dtype)  # (r,) one-hot at b-1
                # Note: detach the *weights* of components < b, not their activations, so the
                # gradient still flows through them to x (and to earlier layers' adapters).
                a = a * g[:, None] + a.detach() * (1 - g)[:, None]  # (r, in)
                b = b * g + b.detach() * (1 - g)  # (out, r)
        else:
            coef = self.eval_coef
        if self.kind == EMBEDDING:
            e = self.base
            assert isinstance(e, nn.Embedding)
            h = F.embedding(
                x, a.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse
            )  # (..., r)
        else:
            h = F.linear(x.to(a.dtype), a)  # (..., r)
        return F.linear(h * coef.to(h.dtype), b)  # (..., r) ⊙ (r,) -> (..., out)

    def factors(self) -> tuple[Tensor, Tensor] | None:
        if self.kind == EMBEDDING or self.training:
            return None  # training draws a rank per step: the per-adapter path runs update()
        return self.lora_A, self.lora_B * self.eval_coef.to(self.lora_B.dtype)

    def delta_weight(self) -> Tensor:
        """ΔW at the evaluation rank b: (α/b) · B[:, :b] A[:b]."""
        return (self.lora_B * self.eval_coef.to(self.lora_B.dtype)) @ self.lora_A  # (out, in)

    def lora_factors(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        b = self.eval_rank if rank is None else self.check_rank(rank)
        a = self.lora_A.detach()[:b]  # (b, in)
        return a, self.lora_B.detach()[:, :b] * (self.lora_alpha / b)  # (out, b)

    def peft_keys(self) -> dict[str, str]:
        if self.kind == EMBEDDING:
            return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
        return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, eval_rank={self.eval_rank}"


class DyLoraHook:
    """Draws b ~ Uniform{r_min, …, r} once per optimizer step from a seeded generator and sets it
    on every layer. Its state (generator, current b, step) travels with the optimizer."""

    def __init__(self, layers: Sequence[DyLoraLayer], config: DyLoraConfig) -> None:
        self.layers = list(layers)
        self.r_min, self.r = config.r_min, config.r
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.rank = self._draw()  # the rank of step 1, applied at attach

    def _draw(self) -> int:
        return int(torch.randint(self.r_min, self.r + 1, (1,), generator=self.generator))

    def _apply(self) -> None:
        for layer in self.layers:
            layer.set_train_rank(self.rank)

    def on_attach(self) -> None:
        self._apply()

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        self.step += 1
        self.rank = self._draw()
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "rank": self.rank, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.rank, self.step = int(state["rank"]), int(state["step"])
        self._apply()


def _layers(model: nn.Module) -> list[tuple[str, DyLoraLayer]]:
    found = [(n, a) for n, a in adapters(model) if isinstance(a, DyLoraLayer)]
    if not found:
        raise ValueError("model has no DyLoRA layers; adapt it with peftkit.DyLoraConfig first")
    return found


def set_rank(model: nn.Module, b: int) -> nn.Module:
    """Use rank ``b`` (1 ≤ b ≤ r) for evaluation and inference, merging and ``export_lora``.
    Training keeps the drawn ranks. Refused while merged (unmerge first). Returns ``model``."""
    layers = _layers(model)
    for _, layer in layers:
        layer.check_rank(b)
    for _, layer in layers:
        layer.set_eval_rank(b)
    return model


def ranks(model: nn.Module) -> dict[str, int]:
    """The evaluation rank of each DyLoRA layer, by module path (for ``peftkit inspect``)."""
    return {name: layer.eval_rank for name, layer in _layers(model)}


def make_layer(base: nn.Module, config: AdapterConfig, spec: LayerSpec) -> DyLoraLayer:
    assert isinstance(config, DyLoraConfig)
    layer = DyLoraLayer(
        base,
        r=config.r,
        alpha=float(config.lora_alpha),
        dropout=config.lora_dropout,
        frozen=config.frozen,
    )
    # Note: a new module starts in training mode; follow the base so an eval-mode model stays so.
    return upcast_adapter(layer, config).train(base.training)


def make_hook(
    model: nn.Module, config: AdapterConfig, layers: Sequence[tuple[str, Adapter]]
) -> DyLoraHook:
    assert isinstance(config, DyLoraConfig)
    return DyLoraHook([a for _, a in layers if isinstance(a, DyLoraLayer)], config)


METHOD = Method(
    name="dylora",
    config_cls=DyLoraConfig,
    make_layer=make_layer,
    make_hook=make_hook,
    reads=lambda d: d.get("peft_type") == "LORA" and d.get("peftkit_method") == "dylora",
)
