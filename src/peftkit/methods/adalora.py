"""AdaLoRA (Zhang et al., ICLR 2023, https://arxiv.org/abs/2303.10512): a global rank budget
spread unevenly over the adapted matrices by importance, on an SVD-like update.

    ΔW = s · P Λ Q = s · B (A ⊙ E),   A = Q ∈ R^{r×in}, E = λ ∈ R^{r×1}, B = P ∈ R^{out×r}
    y  = x W₀ᵀ + b + s · (D(x) (A ⊙ E)ᵀ) Bᵀ,   s = lora_alpha / (init_r + 1e-5)

``r`` starts at ``init_r`` and the scale keeps ``init_r`` even after pruning (PEFT's ``ranknum``).
E starts at 0 and A, B ~ N(0, 0.02²), so the adapted model starts equal to the base.

Training, once per real optimizer step through the method's hook (``peftkit.attach``; nothing for
the user to call), exactly as PEFT's ``update_and_allocate(t)`` with t = 0, 1, … the step index:

* before the step: the orthogonality regulariser's gradient
  ∇ (w / 2n) Σ_k (‖A_k A_kᵀ − I‖_F + ‖B_kᵀ B_k − I‖_F) is added to A.grad and B.grad (PEFT and the
  official code add the term, unsquared and averaged over the 2n matrices, to the loss; the
  gradient is the same and the user's loss stays untouched);
* after the step (post-step weights, the step's gradient, as PEFT's documented loop): for
  t < T − t_final, per entry I = |w · ∂L/∂w|, Ī ← β1 Ī + (1 − β1) I, Ū ← β2 Ū + (1 − β2) |I − Ī|;
  when t_init < t and t % ΔT == 0, triplet i of matrix k scores
  S = Ī·Ū(E_i) + mean_j Ī·Ū(A_ij) + mean_j Ī·Ū(B_ji), and every triplet with S ≤ the
  (b(0) − b(t))-th smallest S over all matrices gets E_i ← 0, with the cubic budget
  b(t) = ⌊b_T + (b(0) − b_T)(1 − (t − t_init)/(T − t_final − t_init))³⌋,
  b(0) = Σ r over matrices, b_T = n·target_r.
  At t = T − t_final the budget is b_T and the EMAs are dropped; later steps re-apply that mask.

Masking is soft, as in PEFT: rows stay, masked E still get gradient and can revive between masking
events. The keep-mask lives in each layer's ``rank_mask`` buffer; ``save_adapter`` writes the kept
rows only and PEFT's ``rank_pattern`` ({"<module path>.lora_E": [bool × init_r]}).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, check_finite_number, check_positive_int, check_probability
from ..core import (
    EMBEDDING,
    PEFT_PREFIX,
    Adapter,
    adapters,
    base_device,
    base_dtype,
    get_state,
    layer_kind,
)
from ..precision import upcast_adapter
from .attached import expect_hook, mark_attached, unattached_message, warn_if_unattached
from .lora import LORA_UNSUPPORTED
from .registry import LayerSpec, Method

UNALLOCATED = (
    "AdaLoRA's rank allocation never ran (init_r={init_r} > target_r={target_r}, no optimizer "
    "step seen), so there is no pruned adapter to save. The allocation runs in the optimizer step: "
    "call peftkit.attach(optimizer, model) before training, or pass "
    "callbacks=[peftkit.integrations.hf.PeftkitCallback()] to the HF Trainer."
)


def _check_nonneg_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}; e.g. {name}=0")


@dataclass(frozen=True, kw_only=True)
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA, with PEFT's field names and defaults. ``init_r``: rank of every matrix at the start;
    ``target_r``: average rank at the end (budget n·target_r triplets); ``total_step``: the number
    of optimizer steps T (required); ``tinit``: steps before any pruning; ``tfinal``: final steps
    with the allocation fixed; ``deltaT``: steps between pruning events; ``beta1``/``beta2``: EMA
    factors of sensitivity and uncertainty; ``orth_reg_weight``: weight of the orthogonality
    regulariser; ``lora_alpha``: the scale's numerator (s = lora_alpha / init_r); ``rank_pattern``:
    a saved allocation ({"<module path>.lora_E": [bool × init_r]}; layers are built with the kept
    rows only, as PEFT loads them); ``r``: ignored, as in PEFT (use ``init_r``);
    ``init_lora_weights=False``: A, B, E ~ N(0, 1) (not a no-op; for tests).

    Steps count real optimizer steps from t = 0, as PEFT's documented loop. The allocation is fixed
    at t = total_step − tfinal, so with tfinal = 0 a run of total_step steps ends one step short of
    it, as in PEFT: use tfinal ≥ 1 to train the last steps on the final allocation."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_lora_weights: bool = True
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: Mapping[str, Sequence[bool]] | None = None

    peft_type: ClassVar[str | None] = "ADALORA"
    unsupported_keys: ClassVar[Mapping[str, Any]] = {
        **LORA_UNSUPPORTED,
        "use_rslora": False,
        "use_dora": False,
        "alpha_pattern": {},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("init_r", self.init_r)
        check_positive_int("target_r", self.target_r)
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r={self.target_r} > init_r={self.init_r}: AdaLoRA only prunes; set "
                f"init_r >= target_r (the paper uses init_r ≈ 1.5 × target_r)"
            )
        check_finite_number("lora_alpha", self.lora_alpha, positive=True)
        check_probability("lora_dropout", self.lora_dropout)
        if self.total_step is None:
            raise ValueError(
                "total_step is required: the number of optimizer steps of the run (the budget "
                "schedule depends on it), e.g. total_step=len(loader) * epochs // grad_accum"
            )
        check_positive_int("total_step", self.total_step)
        for name in ("tinit", "tfinal"):
            _check_nonneg_int(name, getattr(self, name))
        check_positive_int("deltaT", self.deltaT)
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leave no "
                "budgeting phase: tinit < total_step - tfinal is required; lower tinit or tfinal "
                "or raise total_step"
            )
        for name in ("beta1", "beta2"):
            check_finite_number(name, getattr(self, name))
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(
                    f"{name} must be in (0, 1), got {getattr(self, name)!r}; e.g. 0.85"
                )
        check_finite_number("orth_reg_weight", self.orth_reg_weight)
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(
                f"init_lora_weights must be True or False, got {self.init_lora_weights!r}"
            )
        if self.r != 8:
            warnings.warn(
                f"r={self.r} is not used by AdaLoRA and is ignored; the rank is init_r",
                stacklevel=3,
            )
        if self.rank_pattern is not None:
            pattern: dict[str, tuple[bool, ...]] = {}
            for key, mask in dict(self.rank_pattern).items():
                if not isinstance(key, str) or not key.endswith(".lora_E"):
                    raise ValueError(
                        f"rank_pattern key {key!r} must read '<module path>.lora_E' (PEFT's form)"
                    )
                if (
                    not isinstance(mask, Sequence)
                    or len(mask) != self.init_r
                    or not all(isinstance(v, bool) for v in mask)
                ):
                    raise ValueError(
                        f"rank_pattern[{key!r}] must be {self.init_r} (init_r) booleans, got "
                        f"{mask!r}"
                    )
                pattern[key] = tuple(mask)
            object.__setattr__(self, "rank_pattern", pattern)

    @property
    def method(self) -> str:
        return "adalora"

    @classmethod
    def required_keys(cls) -> tuple[str, ...]:
        return ("target_modules", "total_step")


class AdaLoraLayer(Adapter):
    """``base(x) + s · (D(x) (A ⊙ E)ᵀ) Bᵀ`` with ``s = lora_alpha / (init_r + 1e-5)``.

    ``slots[i]`` is the index among the ``init_r`` original triplets that row i holds (all of them
    unless built from a saved ``rank_pattern``); ``rank_mask`` (buffer) marks the rows the last
    allocation kept."""

    roles: ClassVar[dict[str, str]] = {"lora_A": "A", "lora_E": "lambda", "lora_B": "B"}
    rank_mask: Tensor

    def __init__(
        self,
        base: nn.Module,
        *,
        init_r: int,
        slots: Sequence[int],
        alpha: float,
        dropout: float = 0.0,
        init: bool = True,
    ) -> None:
        super().__init__(base, dropout=dropout)
        r = len(slots)
        self.init_r, self.r, self.slots = init_r, r, tuple(slots)
        self.ranknum = init_r  # Note: PEFT keeps the scale's denominator at init_r after pruning.
        self.scaling = alpha / (self.ranknum + 1e-5)
        kw: dict[str, Any] = {"device": base_device(base), "dtype": base_dtype(base)}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_E = nn.Parameter(torch.empty(r, 1, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=kw["device"]))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: bool = True) -> None:
        if init:
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        else:
            for p in (self.lora_A, self.lora_E, self.lora_B):
                nn.init.normal_(p)

    def update(self, x: Tensor) -> Tensor:
        warn_if_unattached(self, UNATTACHED)
        # Note: A ⊙ E is (r, in), cheaper than scaling the (…, r) activation, and it keeps autograd
        # from saving an extra (…, r) tensor for E's gradient.
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A * self.lora_E)  # (..., r)
        return F.linear(h * self.scaling, self.lora_B)  # (..., out)

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling  # (out, r)@(r, in)

    def factors(self) -> tuple[Tensor, Tensor] | None:
        return self.lora_A * self.lora_E, self.lora_B * self.scaling  # (r, in), (out, r)

    def lora_factors(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        """The surviving triplets (E ≠ 0) as ``(A ⊙ E, B · s)``: exactly this layer's ΔW."""
        keep = (self.lora_E.detach().view(-1) != 0).nonzero().view(-1)  # (r',)
        if rank is not None and rank != keep.numel():
            raise ValueError(
                f"this AdaLoRA layer has {keep.numel()} surviving ranks, not {rank}; export it "
                "without rank= (each layer keeps its own rank)"
            )
        if keep.numel() == 0:
            # ΔW = 0, and PEFT's LoRA has no rank-0 layer: a zero rank-1 pair is exact.
            a, b = self.lora_A.detach(), self.lora_B.detach()
            return a.new_zeros(1, self.in_features), b.new_zeros(self.out_features, 1)
        a = (self.lora_A * self.lora_E).detach()[keep]  # (r', in)
        b = self.lora_B.detach()[:, keep] * self.scaling  # (out, r')
        return a, b

    def peft_keys(self) -> dict[str, str]:
        return {"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"}

    def extra_repr(self) -> str:
        kept = int(self.rank_mask.sum())
        return f"{super().extra_repr()}, init_r={self.init_r}, r={self.r}, kept={kept}"


UNATTACHED = unattached_message(
    "AdaLoRA", "no budget is allocated (nothing is pruned) and no orthogonality term is applied"
)


def budget(
    t: int, *, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int
) -> int:
    """b(t): the number of triplets kept after step t (the paper's cubic schedule, PEFT's form)."""
    if t <= tinit:
        return init_bgt
    if t > total_step - tfinal:
        return target_bgt
    mul = 1 - (t - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul**3) + target_bgt)


class RankAllocator:
    """The training hook: orthogonality gradient before each optimizer step, importance EMAs and
    masking after it. Its state (step, EMAs, masks) travels with the optimizer's state_dict."""

    def __init__(self, config: AdaLoraConfig, layers: Sequence[tuple[str, AdaLoraLayer]]) -> None:
        self.config = config
        self.layers = dict(layers)
        self.step = 0
        #: set when the adapter came from a file: its allocation ran in the run that wrote it
        self.from_file = False
        self.ema_ipt: dict[str, Tensor] = {}
        self.ema_unc: dict[str, Tensor] = {}

    def on_attach(self) -> None:
        mark_attached(self.layers.values())

    @property
    def init_bgt(self) -> int:
        return sum(layer.r for layer in self.layers.values())

    @property
    def target_bgt(self) -> int:
        return self.config.target_r * len(self.layers)

    def _params(self) -> list[tuple[str, nn.Parameter]]:
        return [
            (f"{n}.{p}", getattr(layer, p))
            for n, layer in self.layers.items()
            for p in ("lora_A", "lora_E", "lora_B")
        ]

    @torch.no_grad()
    def before_step(self) -> None:
        w = self.config.orth_reg_weight
        if w == 0 or not self.layers:
            return
        c = 2.0 * w / (2 * len(self.layers))  # d‖G − I‖_F/dA = 2 (AAᵀ − I) A / ‖AAᵀ − I‖_F
        for layer in self.layers.values():
            for p, left in ((layer.lora_A, True), (layer.lora_B, False)):
                if not p.requires_grad:
                    continue
                m = p.float()
                gram = m @ m.T if left else m.T @ m  # (r, r)
                gram.diagonal().sub_(1.0)
                scale = c / torch.linalg.matrix_norm(gram).clamp_min(1e-30)  # G = 0 gives 0
                g = (gram @ m if left else m @ gram) * scale  # (r, in) / (out, r)
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.add_(g.to(p.grad.dtype))

    @torch.no_grad()
    def after_step(self) -> None:
        cfg, t = self.config, self.step
        assert cfg.total_step is not None
        final = cfg.total_step - cfg.tfinal
        if t < final:
            self._update_importance()
            if t > cfg.tinit and t % cfg.deltaT == 0:
                self._mask_to_budget(
                    budget(
                        t,
                        init_bgt=self.init_bgt,
                        target_bgt=self.target_bgt,
                        tinit=cfg.tinit,
                        tfinal=cfg.tfinal,
                        total_step=cfg.total_step,
                    )
                )
        elif t == final:
            self._mask_to_budget(self.target_bgt)
            self.ema_ipt, self.ema_unc = {}, {}
        else:
            for layer in self.layers.values():
                layer.lora_E.masked_fill_(~layer.rank_mask.view(-1, 1), 0.0)
        self.step += 1

    def _update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for key, p in self._params():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)  # an unused layer
            ipt = (p * grad).abs()
            avg = self.ema_ipt.get(key, torch.zeros_like(p))
            unc = self.ema_unc.get(key, torch.zeros_like(p))
            avg = b1 * avg + (1 - b1) * ipt
            self.ema_ipt[key] = avg
            self.ema_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _score(self, key: str, like: Tensor) -> Tensor:
        if key not in self.ema_ipt:
            return torch.zeros_like(like)
        return self.ema_ipt[key] * self.ema_unc[key]

    def scores(self) -> dict[str, Tensor]:
        """S per triplet of each layer: s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)."""
        out = {}
        for n, layer in self.layers.items():
            s_a = self._score(f"{n}.lora_A", layer.lora_A).mean(dim=1)  # (r,)
            s_b = self._score(f"{n}.lora_B", layer.lora_B).mean(dim=0)  # (r,)
            s_e = self._score(f"{n}.lora_E", layer.lora_E).view(-1)  # (r,)
            out[n] = s_e + (s_a + s_b)
        return out

    def _mask_to_budget(self, bgt: int) -> None:
        k = self.init_bgt - bgt
        if k <= 0:
            return
        scores = self.scores()
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values
        # Note: ``S <= τ`` as PEFT, so ties at τ prune more than k triplets.
        for n, layer in self.layers.items():
            keep = scores[n] > threshold
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            layer.rank_mask.copy_(keep)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "from_file": self.from_file}
        for key, v in self.ema_ipt.items():
            out[f"ema_ipt/{key}"] = v
            out[f"ema_unc/{key}"] = self.ema_unc[key]
        for n, layer in self.layers.items():
            out[f"mask/{n}"] = layer.rank_mask
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = {k[5:]: v for k, v in state.items() if k.startswith("mask/")}
        if set(masks) != set(self.layers):
            raise ValueError(
                "AdaLoRA hook state was saved for other layers: "
                f"{sorted(set(masks) ^ set(self.layers))[:4]}"
            )
        self.step, self.from_file = int(state["step"]), bool(state.get("from_file", False))
        for n, layer in self.layers.items():
            layer.rank_mask.copy_(masks[n])
        dev = dict(self._params())
        self.ema_ipt = {
            k[8:]: v.to(dev[k[8:]].device) for k, v in state.items() if k.startswith("ema_ipt/")
        }
        self.ema_unc = {
            k[8:]: v.to(dev[k[8:]].device) for k, v in state.items() if k.startswith("ema_unc/")
        }


def _layers(model: nn.Module) -> list[tuple[str, AdaLoraLayer]]:
    found = [(n, a) for n, a in adapters(model) if isinstance(a, AdaLoraLayer)]
    if not found:
        raise ValueError("model has no AdaLoRA layers; adapt it with peftkit.AdaLoraConfig first")
    return found


def _allocator(model: nn.Module) -> RankAllocator | None:
    state = get_state(model)
    assert state is not None
    return next((h for h in state.hooks if isinstance(h, RankAllocator)), None)


def ranks(model: nn.Module) -> dict[str, int]:
    """The rank each AdaLoRA layer keeps after the last allocation, by module path."""
    return {name: int(layer.rank_mask.sum()) for name, layer in _layers(model)}


def rank_pattern(model: nn.Module) -> dict[str, list[bool]] | None:
    """PEFT's ``rank_pattern`` of the current allocation ({"<path>.lora_E": [bool × init_r]}),
    or None while nothing is pruned (as PEFT before its first allocation)."""
    layers = _layers(model)
    if all(a.r == a.init_r and bool(a.rank_mask.all()) for _, a in layers):
        return None
    out = {}
    for name, layer in layers:
        full = [False] * layer.init_r
        for i in layer.rank_mask.nonzero().view(-1).tolist():
            full[layer.slots[i]] = True
        out[f"{name}.lora_E"] = full
    return out


def on_save(model: nn.Module, d: dict[str, Any], tensors: dict[str, Tensor]) -> None:

    state = get_state(model)
    assert state is not None
    cfg = state.config
    assert isinstance(cfg, AdaLoraConfig)
    hook = _allocator(model)
    ran = hook is not None and (hook.step > 0 or hook.from_file)
    if cfg.init_r > cfg.target_r and cfg.rank_pattern is None and not ran:
        raise ValueError(UNALLOCATED.format(init_r=cfg.init_r, target_r=cfg.target_r))
    pattern = rank_pattern(model)
    d["rank_pattern"] = pattern
    if pattern is None:
        return
    for name, layer in _layers(model):
        keep = layer.rank_mask.nonzero().view(-1)  # (r_k,)
        for suffix, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            key = f"{PEFT_PREFIX}{name}.{suffix}"
            tensors[key] = tensors[key].detach().index_select(dim, keep)


def on_load(model: nn.Module, d: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    hook = _allocator(model)
    if hook is not None:
        hook.from_file = True
    return tensors


def check(model: nn.Module, config: Any, targets: Sequence[tuple[str, nn.Module]]) -> None:
    assert isinstance(config, AdaLoraConfig)
    for name, module in targets:
        if layer_kind(module) == EMBEDDING:
            raise TypeError(
                f"target {name!r} is an nn.Embedding; AdaLoRA (here as in PEFT) adapts linear "
                "layers only. Drop it from target_modules, or use LoraConfig for embeddings."
            )
    if config.rank_pattern:
        known = {f"{name}.lora_E" for name, _ in targets}
        unknown = sorted(set(config.rank_pattern) - known)
        if unknown:
            raise ValueError(
                f"rank_pattern keys {unknown[:4]} name no adapted module; expected keys like "
                f"{sorted(known)[:2]}"
            )


def make_layer(base: nn.Module, config: AdapterConfig, spec: LayerSpec) -> AdaLoraLayer:
    assert isinstance(config, AdaLoraConfig)
    slots: Sequence[int] = range(config.init_r)
    mask = (config.rank_pattern or {}).get(f"{spec.name}.lora_E")
    if mask is not None:
        slots = [i for i, kept in enumerate(mask) if kept]
    layer = AdaLoraLayer(
        base,
        init_r=config.init_r,
        slots=slots,
        alpha=float(config.lora_alpha),
        dropout=config.lora_dropout,
        init=config.init_lora_weights,
    )
    return upcast_adapter(layer, config)


def make_hook(
    model: nn.Module, config: AdapterConfig, layers: Sequence[tuple[str, Adapter]]
) -> RankAllocator:
    assert isinstance(config, AdaLoraConfig)
    hook = RankAllocator(config, [(n, a) for n, a in layers if isinstance(a, AdaLoraLayer)])
    expect_hook(hook.layers.values())
    return hook


METHOD = Method(
    name="adalora",
    config_cls=AdaLoraConfig,
    make_layer=make_layer,
    make_hook=make_hook,
    check=check,
    on_save=on_save,
    on_load=on_load,
    reads=lambda d: d.get("peft_type") == "ADALORA",
)
