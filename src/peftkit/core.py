"""The adapter base class and the model-level operations built on it.

An :class:`Adapter` wraps one frozen layer (``self.base``) and adds a branch:
``forward(x) = base(x) + update(dropout(x))``. Everything else — merging, saving, LoRA+ groups,
LoRA-FA freezing — reads the adapter's declared parameter *roles*, never parameter names.

Layers are seen through one orientation: a dense ``(out, in)`` weight. ``nn.Linear`` stores it so;
GPT-2's ``Conv1D`` stores the transpose; an ``nn.Embedding`` of ``(V, d)`` is a linear map from a
one-hot of size ``V`` to ``d``, so its dense weight is ``weight.T``; an NF4 linear dequantises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .config import AdapterConfig
    from .hooks import TrainingHook

LINEAR, CONV1D, EMBEDDING, NF4 = "linear", "conv1d", "embedding", "nf4"


def bypassable(base: nn.Module) -> bool:
    """Whether a fused adapter path may compute ``base``'s output itself instead of calling it:
    nothing hooks the base (its own forward/backward hooks, the global module hooks) and nothing
    replaced its ``forward`` (FSDP's unshard, accelerate's offload, user hooks)."""
    m = nn.modules.module
    own = (base._forward_hooks, base._forward_pre_hooks, base._backward_hooks)
    everyone = (
        m._global_forward_hooks,
        m._global_forward_pre_hooks,
        m._global_backward_hooks,
        m._global_backward_pre_hooks,
    )
    return not any(own) and not base._backward_pre_hooks and not any(everyone) and (
        "forward" not in vars(base)
    )


def layer_kind(module: nn.Module) -> str | None:
    """Which of the wrappable layer kinds ``module`` is, or None."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    name = type(module).__name__
    # Note: matched by class name and layout so the core never imports transformers.
    if name == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return CONV1D
    if callable(getattr(module, "dequantize", None)) and hasattr(module, "in_features"):
        return NF4
    return None


def stored_weight(module: nn.Module) -> Tensor:
    """``module.weight`` as stored (Conv1D: ``(in, out)``), typed."""
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a wrappable layer, in the dense orientation."""
    kind = layer_kind(module)
    if kind == CONV1D:
        w = stored_weight(module)
        return int(w.shape[0]), int(w.shape[1])
    if kind == EMBEDDING:
        assert isinstance(module, nn.Embedding)
        return module.num_embeddings, module.embedding_dim
    if kind in (LINEAR, NF4):
        return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]
    raise TypeError(f"{type(module).__name__} is not a layer peftkit can wrap")


def dense_weight(base: nn.Module) -> Tensor:
    """The frozen weight of ``base`` as a dense ``(out, in)`` tensor (a view where possible)."""
    kind = layer_kind(base)
    if kind == LINEAR:
        return stored_weight(base)
    if kind in (CONV1D, EMBEDDING):
        return stored_weight(base).T
    if kind == NF4:
        w: Tensor = base.dequantize()  # type: ignore[operator]
        return w
    raise TypeError(f"{type(base).__name__} is not a layer peftkit can wrap")


def base_dtype(base: nn.Module) -> torch.dtype:
    if layer_kind(base) == NF4:
        dtype = getattr(base, "compute_dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32
    return stored_weight(base).dtype


def base_device(base: nn.Module) -> torch.device:
    for t in (*base.parameters(), *base.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def add_to_base_weight(base: nn.Module, delta: Tensor) -> None:
    """``W += delta`` for a dense ``(out, in)`` delta, in the layer's own storage layout."""
    kind = layer_kind(base)
    if kind == NF4:
        raise ValueError(
            "cannot merge into an NF4 base: re-quantising silently erases small adapters. "
            "Use merge_and_unload(model, dtype=torch.bfloat16) for a 16-bit merged model."
        )
    w = stored_weight(base)
    d = delta if kind == LINEAR else delta.T
    w.add_(d.to(w.dtype))


class Switchable(nn.Module):
    """A module that ``disable_adapters`` can switch to the base model's behaviour."""

    disabled: bool = False


class Adapter(Switchable):
    """A frozen layer plus a trainable branch.

    Subclasses set ``roles`` (parameter name → role: ``"A"``, ``"B"``, ``"magnitude"``, …),
    implement :meth:`update` and, ideally, :meth:`delta_weight` in closed form, and declare the
    PEFT key of each saved tensor with :meth:`peft_keys`.
    """

    roles: ClassVar[dict[str, str]] = {}

    def __init__(self, base: nn.Module, *, dropout: float = 0.0) -> None:
        super().__init__()
        kind = layer_kind(base)
        if kind is None:
            raise TypeError(f"{type(base).__name__} is not a layer peftkit can wrap")
        self.base = base
        self.kind = kind
        self.in_features, self.out_features = layer_shape(base)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        #: set by ``adapt`` when the base weight is shared with another module
        self.weight_tied = False

    # -- the branch -------------------------------------------------------------------------------
    def update(self, x: Tensor) -> Tensor:
        """The additive branch for input ``x`` (already dropped out): ``x ΔWᵀ``."""
        raise NotImplementedError

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out: Tensor = self.base(x, *args, **kwargs)
        if self.disabled or self.merged:
            return out
        return out + self.update(self.dropout(x)).to(out.dtype)

    # -- merging ----------------------------------------------------------------------------------
    def delta_weight(self) -> Tensor:
        """ΔW as a dense ``(out, in)`` tensor. Generic form: push the identity through the branch
        (exact for any linear branch); methods override it with the closed form."""
        p = next(iter(self.parameters()))
        if self.kind == EMBEDDING:
            eye = torch.arange(self.in_features, device=p.device)
        else:
            eye = torch.eye(self.in_features, device=p.device, dtype=p.dtype)
        disabled, self.disabled = self.disabled, False
        try:
            return self.update(eye).T  # (out, in)
        finally:
            self.disabled = disabled

    def merged_weight(self) -> Tensor:
        """The dense ``(out, in)`` weight that computes base + branch (DoRA overrides it)."""
        return dense_weight(self.base).float() + self.delta_weight().float()

    def merge(self) -> None:
        """Fold the branch into the base weight: ``W ← W + ΔW``."""
        if self.merged:
            raise ValueError("adapter is already merged; a second merge would apply it twice")
        if self.weight_tied:
            self._untie_for_merge()
        else:
            add_to_base_weight(self.base, self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W ← W − ΔW`` (exact up to floating-point round-off; exact for a
        tied weight, whose original tensor is put back)."""
        if not self.merged:
            raise ValueError("adapter is not merged; nothing to unmerge")
        if self.weight_tied:
            self.base.weight = self.__dict__.pop("_tied_original")
        else:
            add_to_base_weight(self.base, -self.delta_weight())
        self.merged = False

    @torch.no_grad()
    def _untie_for_merge(self) -> None:
        # Note: a weight tied to another module (GPT-2's wte and lm_head) must not change under
        # that module: the merged layer gets its own tensor, and unmerge restores the shared one.
        w = self.base.weight
        assert isinstance(w, nn.Parameter)
        self.__dict__["_tied_original"] = w  # kept out of parameters() and state_dict()
        self.base.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        add_to_base_weight(self.base, self.delta_weight())

    def trainable_names(self) -> tuple[str, ...]:
        """The role parameters ``adapt`` makes trainable (LoRA-FA keeps A frozen)."""
        return tuple(self.roles)

    def on_unload(self) -> None:
        """Called by ``unload`` before the base goes back (Delta-LoRA restores W₀ here)."""

    # -- files ------------------------------------------------------------------------------------
    def peft_keys(self) -> dict[str, str]:
        """Local tensor name → the suffix PEFT writes after ``base_model.model.<module path>.``"""
        return {name: f"{name}.weight" for name in self.roles}

    def lora_factors(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        """``(A, B)`` with ``B @ A == ΔW`` exactly, for :func:`peftkit.export_lora`; ``rank``
        truncates where the method allows it.

        Raises ``ValueError`` where ΔW has no exact low-rank form (naming the alternative)."""
        raise ValueError(
            f"{type(self).__name__} has no exact LoRA form (its update is full-rank in general); "
            "use peftkit.merge_and_unload(model) for a merged model instead"
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in={self.in_features}, out={self.out_features}"


class ModulesToSave(Switchable):
    """A module trained in full: a trainable copy beside the frozen original (PEFT's
    ``modules_to_save``). ``disable_adapters`` routes back to the original."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        import copy

        self.original = original
        self.trained = copy.deepcopy(original)
        for p in self.original.parameters():
            p.requires_grad_(False)
        for p in self.trained.parameters():
            p.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.original if self.disabled else self.trained)(*args, **kwargs)


@dataclass
class AdapterState:
    """What ``adapt`` records on the model: its config and its training hooks."""

    config: AdapterConfig
    hooks: list[TrainingHook] = field(default_factory=list)
    shared: nn.Module | None = None


STATE_ATTR = "peftkit_state"


def unwrap(model: nn.Module) -> nn.Module:
    """The adapted model inside a DDP/accelerate wrapper (or ``model`` itself)."""
    seen = 0
    while not hasattr(model, STATE_ATTR) and hasattr(model, "module") and seen < 4:
        model = model.module  # type: ignore[assignment]
        seen += 1
    return model


def get_state(model: nn.Module, *, required: bool = True) -> AdapterState | None:
    state = getattr(unwrap(model), STATE_ATTR, None)
    if state is None and required:
        raise ValueError("model has no peftkit adapter; call peftkit.adapt(model, config) first")
    return state


def adapters(model: nn.Module) -> Iterator[tuple[str, Adapter]]:
    """``(module path, adapter)`` for every adapter layer in ``model``."""
    for name, m in unwrap(model).named_modules():
        if isinstance(m, Adapter):
            yield name, m


def merge(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (zero inference latency). Refuses a second merge."""
    layers = [a for _, a in adapters(model)]
    if not layers:
        raise ValueError("model has no adapter layers to merge")
    if any(a.merged for a in layers):
        raise ValueError("model is already merged; call unmerge(model) first")
    for a in layers:
        a.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`."""
    layers = [a for _, a in adapters(model)]
    if not any(a.merged for a in layers):
        raise ValueError("model is not merged; nothing to unmerge")
    for a in layers:
        if a.merged:
            a.unmerge()
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this context the model computes exactly what the base model computes: adapters,
    replaced attention and ``modules_to_save`` copies are all bypassed. A merged model is
    unmerged for the duration and merged again on exit."""
    root = unwrap(model)
    switches = [m for m in root.modules() if isinstance(m, Switchable)]
    was_merged = [a for a in switches if isinstance(a, Adapter) and a.merged]
    previous = [m.disabled for m in switches]
    for a in was_merged:
        a.unmerge()
    for m in switches:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(switches, previous, strict=True):
            m.disabled = d
        for a in was_merged:
            a.merge()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a ``modules_to_save`` original is not counted
    twice, and a quantised base counts its logical (unpacked) size."""
    root = unwrap(model)
    trainable = total = 0
    skip: set[int] = set()
    for m in root.modules():
        if isinstance(m, ModulesToSave):
            skip.update(id(p) for p in m.original.parameters())
    for m in root.modules():
        if layer_kind(m) == NF4 and not isinstance(m, Adapter):
            total += int(m.in_features) * int(m.out_features)  # type: ignore[arg-type]
    seen: set[int] = set()
    for p in root.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
