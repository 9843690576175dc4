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
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .config import AdapterConfig

LINEAR, CONV1D, EMBEDDING, NF4 = "linear", "conv1d", "embedding", "nf4"
#: Every key in PEFT's adapter files starts with this.
PEFT_PREFIX = "base_model.model."
DEFAULT = "default"


@runtime_checkable
class TrainingHook(Protocol):
    """What a method implements to act between optimizer steps (see :mod:`peftkit.hooks`).

    A hook may also define ``on_attach()`` (not part of the protocol check): ``attach`` calls
    it once the optimizer's hooks are registered (DyLoRA starts driving the drawn rank there)."""

    def before_step(self) -> None:
        """Runs inside ``optimizer.step()``, before the parameters move (gradients are final)."""

    def after_step(self) -> None:
        """Runs inside ``optimizer.step()``, after the parameters moved."""

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values needed to resume exactly."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
        self.base = base  # a reference, not a submodule: the AdaptedLayer holding it owns base
        self.kind = kind
        self.in_features, self.out_features = layer_shape(base)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        #: set by ``adapt`` when the base weight is shared with another module
        self.weight_tied = False

    def __setattr__(self, name: str, value: Any) -> None:
        # Note: several adapters share one base (one AdaptedLayer, many names), so ``base`` is a
        # plain reference here; the holder registers it once (one key in state_dict, one .to()).
        if name == "base":
            self._modules.pop("base", None)
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    # -- the branch -------------------------------------------------------------------------------
    def update(self, x: Tensor) -> Tensor:
        """The additive branch for input ``x`` (already dropped out): ``x ΔWᵀ``."""
        raise NotImplementedError

    def factors(self) -> tuple[Tensor, Tensor] | None:
        """``(A, B')`` with ``update(x) == x Aᵀ B'ᵀ`` (the scale folded into B'), differentiable,
        for mixed-adapter batches (stacked and gathered per row); None where the update has no
        such form here (MoRA, embeddings, a rank drawn per step)."""
        return None

    def row_scale(self) -> Tensor | None:
        """A per-output factor g with ``forward(x) = g ⊙ (base(x) − b + x Aᵀ B'ᵀ) + b`` (DoRA's
        magnitude over the detached norm), or None for an additive update."""
        return None

    def add_to(self, x: Tensor, out: Tensor) -> Tensor:
        """``out`` plus what this adapter adds to its base's output for input ``x`` (several
        active adapters on one layer add their updates, as in PEFT)."""
        if self.disabled or self.merged:
            return out
        return out + self.update(self.dropout(x)).to(out.dtype)

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


class AdaptedLayer(Switchable):
    """What replaces a target layer: the original as ``base`` and its adapters by name.

    With one active adapter the layer is that adapter's forward (its fused paths included);
    several active adapters add their updates to one base output (PEFT's rule); inside
    :func:`peftkit.route` each row or token gets its own adapter (:mod:`peftkit.routing`)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        #: the names that this layer's forward applies, in order (set by ``set_adapter``)
        self.active: list[str] = []
        self.model_state: ModelState | None = None  # set by ``adapt``: where routes live

    # Note: models read a layer's weight from outside its forward (T5's feed-forward casts its
    # input to ``wo.weight.dtype``; transformers ties an output head by setting its ``weight``),
    # so the wrapper answers for the base: reads give the base's tensors, and setting ``weight``
    # or ``bias`` sets the base's (a property alone would make transformers' tying raise, and
    # nn.Module would otherwise register a second, stray parameter on the wrapper).
    @property
    def weight(self) -> Tensor:
        """The base layer's ``weight``, as stored (NF4: its packed codes)."""
        w: Tensor = self.base.weight
        return w

    @property
    def bias(self) -> Tensor | None:
        """The base layer's ``bias`` (None where it has none)."""
        b: Tensor | None = getattr(self.base, "bias", None)
        return b

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("weight", "bias"):
            setattr(self.base, name, value)
            state = self.__dict__.get("model_state")
            if state is not None:  # cached stacks and plans may hold the old tensor
                state.generation += 1
            return
        super().__setattr__(name, value)

    def add(self, name: str, adapter: Adapter) -> None:
        if adapter.base is not self.base:
            raise ValueError(f"adapter {name!r} wraps another base than this layer's")
        self.adapters[name] = adapter

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapters = self.adapters
        if self.disabled:
            if len(adapters) == 1:  # its own disabled path (Delta-LoRA undoes its change to W)
                only: Tensor = next(iter(adapters.values()))(x, *args, **kwargs)
                return only
            out: Tensor = self.base(x, *args, **kwargs)
            return out
        st = self.model_state
        route = st.route if st is not None else None
        if route is not None:
            y: Tensor = route.forward(self, x, *args, **kwargs)  # peftkit.routing.Route
            return y
        active = self.active
        if len(active) == 1:
            one: Tensor = adapters[active[0]](x, *args, **kwargs)
            return one
        out = self.base(x, *args, **kwargs)
        for name in active:
            out = adapters[name].add_to(x, out)
        return out

    def extra_repr(self) -> str:
        return f"active={self.active}"


class ModulesToSave(Switchable):
    """A module trained in full: a trainable copy per adapter beside the frozen original (PEFT's
    ``modules_to_save``). ``disable_adapters`` routes back to the original; the first active
    adapter with a copy is used, else the original."""

    def __init__(self, original: nn.Module, name: str = DEFAULT) -> None:
        super().__init__()
        self.original = original
        for p in self.original.parameters():
            p.requires_grad_(False)
        self.copies = nn.ModuleDict()
        self.active: list[str] = [name]
        self.model_state: ModelState | None = None
        self.add(name)

    def add(self, name: str) -> None:
        import copy

        trained = copy.deepcopy(self.original)
        for p in trained.parameters():
            p.requires_grad_(True)
        self.copies[name] = trained

    @property
    def trained(self) -> nn.Module:
        """The copy that the forward uses now (the original when no active adapter has one)."""
        for name in self.active:
            if name in self.copies:
                return self.copies[name]
        return self.original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            return self.original(*args, **kwargs)
        st = self.model_state
        if st is not None and st.route is not None:
            return st.route.copies(self, *args, **kwargs)  # peftkit.routing.Route
        return self.trained(*args, **kwargs)


@dataclass
class AdapterState:
    """What ``adapt`` records for one named adapter: its config, training hooks and shared
    module (VeRA's projections, LongLoRA's settings)."""

    config: AdapterConfig
    hooks: list[TrainingHook] = field(default_factory=list)
    shared: nn.Module | None = None


@dataclass
class ModelState:
    """What an adapted model carries (``model.peftkit_state``): its adapters by name in the order
    they were added, the active names, and the route of a mixed batch while one is open.

    ``focus`` names the adapter that model-level helpers (``adapters(model)``, ``state.config``)
    look at while one adapter is saved, loaded or merged (:func:`focused`)."""

    adapters: dict[str, AdapterState] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    route: Any = None
    focus: str | None = None
    #: bumped whenever adapters are added, deleted or (un)merged: layers' caches key on it
    generation: int = 0
    _parts: Any = field(default=None, repr=False, compare=False)

    def names(self) -> list[str]:
        return list(self.adapters)

    def parts(
        self, root: nn.Module
    ) -> tuple[list[tuple[str, AdaptedLayer]], list[tuple[str, ModulesToSave]]]:
        """Every :class:`AdaptedLayer` and :class:`ModulesToSave` of ``root`` by path: one walk
        over the modules per generation (a server opens a route and switches adapters often;
        a walk over a 30-layer model's modules costs milliseconds)."""
        key = (self.generation, id(root))
        if self._parts is None or self._parts[0] != key:
            layers, copies = [], []
            for path, m in root.named_modules():
                if isinstance(m, AdaptedLayer):
                    layers.append((path, m))
                elif isinstance(m, ModulesToSave):
                    copies.append((path, m))
            self._parts = (key, layers, copies)
        return self._parts[1], self._parts[2]

    def current(self) -> str:
        """The adapter a single-adapter helper means: the focused one, else the only one, else
        the first active one."""
        if self.focus is not None:
            return self.focus
        if len(self.adapters) == 1:
            return next(iter(self.adapters))
        if self.active:
            return self.active[0]
        raise ValueError(
            f"model has adapters {self.names()} and none is active; pass name= or set_adapter"
        )

    def resolve(self, name: str | None) -> str:
        """``name`` if the model has it (else a ``ValueError`` listing them); None: the current."""
        if name is None:
            return self.current()
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; the model has {self.names()}")
        return name

    @property
    def config(self) -> AdapterConfig:
        return self.adapters[self.current()].config

    @property
    def hooks(self) -> list[TrainingHook]:
        """Every adapter's hooks (focused: that adapter's), in the order the adapters were added:
        each hook acts on its own adapter's layers only."""
        if self.focus is not None:
            return self.adapters[self.focus].hooks
        return [h for a in self.adapters.values() for h in a.hooks]

    @property
    def shared(self) -> nn.Module | None:
        return self.adapters[self.current()].shared


STATE_ATTR = "peftkit_state"


def unwrap(model: nn.Module) -> nn.Module:
    """The adapted model inside a DDP/accelerate wrapper (or ``model`` itself)."""
    seen = 0
    while not hasattr(model, STATE_ATTR) and hasattr(model, "module") and seen < 4:
        model = model.module  # type: ignore[assignment]
        seen += 1
    return model


def get_state(model: nn.Module, *, required: bool = True) -> ModelState | None:
    state = getattr(unwrap(model), STATE_ATTR, None)
    if state is None and required:
        raise ValueError("model has no peftkit adapter; call peftkit.adapt(model, config) first")
    return state


def model_state(model: nn.Module) -> ModelState:
    """The adapted model's :class:`ModelState` (``ValueError`` if it has no adapter)."""
    state = get_state(model)
    assert state is not None
    return state


def check_name(model: nn.Module, name: str) -> str:
    """``name`` if the model has an adapter of that name, else ``ValueError`` listing them."""
    return model_state(model).resolve(name)


@contextlib.contextmanager
def focused(model: nn.Module, name: str | None) -> Iterator[ModelState]:
    """Inside, model-level helpers see adapter ``name`` alone (None: no change)."""
    state = model_state(model)
    if name is None:
        yield state
        return
    check_name(model, name)
    before, state.focus = state.focus, name
    try:
        yield state
    finally:
        state.focus = before


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """``(module path, layer)`` for every :class:`AdaptedLayer` in ``model``."""
    for name, m in unwrap(model).named_modules():
        if isinstance(m, AdaptedLayer):
            yield name, m


def adapters(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, Adapter]]:
    """``(module path, adapter)`` for the adapters named ``name`` (default: the focused adapter
    while one is focused, else every adapter of every name), by the path of the layer they
    adapt."""
    root = unwrap(model)
    state = getattr(root, STATE_ATTR, None)
    if name is None and state is not None:
        name = state.focus
    held: list[str] = []
    for path, m in root.named_modules():
        if isinstance(m, AdaptedLayer):
            held.append(path + ".")
            for n, a in m.adapters.items():
                if name is None or n == name:
                    yield path, a  # type: ignore[misc]
        elif isinstance(m, Adapter) and not any(path.startswith(h) for h in held):
            if name is None or name == DEFAULT:
                yield path, m  # an adapter placed by hand, outside an AdaptedLayer


def modules_to_save(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, m in unwrap(model).named_modules():
        if isinstance(m, ModulesToSave):
            yield name, m


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Merge adapter ``name`` (default: the active adapters) into the base weights: zero
    inference latency. Refuses a second merge."""
    state = model_state(model)
    names = [check_name(model, name)] if name is not None else list(state.active)
    layers = [a for n in names for _, a in adapters(model, n)]
    if not layers:
        raise ValueError("model has no adapter layers to merge")
    if any(a.merged for a in layers):
        raise ValueError("model is already merged; call unmerge(model) first")
    for a in layers:
        a.merge()
    state.generation += 1
    return model


def unmerge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Undo :func:`merge` (of ``name``; default: every merged adapter, last merged first)."""
    state = model_state(model)
    names = [check_name(model, name)] if name is not None else state.names()
    layers = [a for n in names for _, a in adapters(model, n)]
    if not any(a.merged for a in layers):
        raise ValueError("model is not merged; nothing to unmerge")
    for a in reversed(layers):
        if a.merged:
            a.unmerge()
    state.generation += 1
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
    for a in reversed(was_merged):
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
