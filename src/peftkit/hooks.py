"""Training-time dynamics through one mechanism: hooks on the optimizer's step.

Methods that act between steps (AdaLoRA's budget, DyLoRA's rank draw, DoRA-Mao's pruning,
Delta-LoRA's update of W) declare a :class:`TrainingHook`. :func:`attach` registers torch's
optimizer step pre/post hooks, so each hook runs once per *real* optimizer step: gradient
accumulation needs nothing, and a step that a ``GradScaler`` skips (it never calls
``optimizer.step()``) runs no hook. The user's loop does not change.

Hook state travels with the optimizer's ``state_dict`` under the key ``"peftkit_hooks"``, so a
resumed run continues exactly.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from .core import TrainingHook, get_state, model_state, unwrap
from .files import write_files

STATE_KEY = "peftkit_hooks"


def register_hook(model: nn.Module, hook: TrainingHook, *, name: str | None = None) -> None:
    """Add a hook to adapter ``name`` of an adapted model (default: the only or first active
    one). Methods add theirs at ``adapt``; this is for extensions."""
    if not isinstance(hook, TrainingHook):
        raise TypeError(f"{type(hook).__name__} does not implement the TrainingHook protocol")
    state = model_state(model)
    target = name if name is not None else state.current()
    if target not in state.adapters:
        raise ValueError(f"no adapter named {target!r}; the model has {state.names()}")
    state.adapters[target].hooks.append(hook)


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    # Note: accelerate's AcceleratedOptimizer wraps the real optimizer and calls its step() only on
    # real steps (after accumulation, not on a scaler skip): hook the innermost one.
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach needs a torch optimizer, got {type(optimizer).__name__}")
    return optimizer


def attach(optimizer: Any, model: nn.Module) -> None:
    """Run ``model``'s training hooks once per real step of ``optimizer``. Idempotent."""
    opt = _inner_optimizer(optimizer)
    root = unwrap(model)
    state = get_state(root)
    assert state is not None
    attached: dict[int, Any] = opt.__dict__.setdefault("_peftkit_attached", {})
    if id(root) in attached:
        return
    ref = weakref.ref(root)

    def hooks() -> list[TrainingHook]:
        m = ref()
        s = get_state(m, required=False) if m is not None else None
        return list(s.hooks) if s is not None else []

    def pre(_opt: Any, _args: Any, _kwargs: Any) -> None:
        for h in hooks():
            h.before_step()

    def post(_opt: Any, _args: Any, _kwargs: Any) -> None:
        for h in hooks():
            h.after_step()

    def save(_opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
        sd[STATE_KEY] = [h.state_dict() for h in hooks()]
        return sd

    def load(_opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
        sd = dict(sd)
        saved = sd.pop(STATE_KEY, None)
        hs = hooks()
        if saved is not None:
            if len(saved) != len(hs):
                raise ValueError(
                    f"optimizer state holds {len(saved)} peftkit hook states, the model has "
                    f"{len(hs)}; was it saved from a different adapter?"
                )
            for h, s in zip(hs, saved, strict=True):
                h.load_state_dict(s)
        return sd

    handles = [
        opt.register_step_pre_hook(pre),
        opt.register_step_post_hook(post),
        opt.register_state_dict_post_hook(save),
        opt.register_load_state_dict_pre_hook(load),
    ]
    attached[id(root)] = handles
    for h in hooks():
        # Optional: a hook that acts on the forward (DyLoRA's drawn rank) starts driving it now.
        on_attach = getattr(h, "on_attach", None)
        if callable(on_attach):
            on_attach()


def detach(optimizer: Any, model: nn.Module) -> None:
    """Undo :func:`attach`."""
    opt = _inner_optimizer(optimizer)
    attached: dict[int, Any] = opt.__dict__.get("_peftkit_attached", {})
    for h in attached.pop(id(unwrap(model)), []):
        h.remove()


def is_attached(optimizer: Any, model: nn.Module) -> bool:
    opt = _inner_optimizer(optimizer)
    return id(unwrap(model)) in opt.__dict__.get("_peftkit_attached", {})


def hook_tensors(state: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors of a hook state (for checkpoint writers that store tensors separately)."""
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def flatten_state(value: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """The JSON skeleton of ``value`` with every tensor moved into ``tensors`` (by key)."""
    if isinstance(value, Tensor):
        key = prefix or "_"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"hook state keys must be strings, got {k!r} at {prefix!r}")
        return {
            k: flatten_state(v, f"{prefix}.{k}" if prefix else k, tensors) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"hook state value at {prefix!r} is a {type(value).__name__}; use tensors or JSON values"
    )


def unflatten_state(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: unflatten_state(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [unflatten_state(v, tensors) for v in value]
    return value


def save_hook_state(model: nn.Module, directory: str | Any) -> None:
    """Write the model's hook states as ``peftkit_hooks.json`` + ``peftkit_hooks.safetensors``
    (no pickle), atomically. Used by the Trainer callback's checkpoints and ``peftkit train``."""
    from pathlib import Path


    state = get_state(model)
    assert state is not None
    tensors: dict[str, Tensor] = {}
    skeleton = [flatten_state(h.state_dict(), str(i), tensors) for i, h in enumerate(state.hooks)]
    write_files(
        Path(directory), {"peftkit_hooks.json": skeleton}, {"peftkit_hooks.safetensors": tensors}
    )


def load_hook_state(model: nn.Module, directory: str | Any) -> bool:
    """Restore what :func:`save_hook_state` wrote; returns False when the folder has none."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(directory)
    meta, data = path / "peftkit_hooks.json", path / "peftkit_hooks.safetensors"
    if not meta.is_file():
        return False
    state = get_state(model)
    assert state is not None
    skeleton = json.loads(meta.read_text(encoding="utf-8"))
    tensors = load_file(str(data)) if data.is_file() else {}
    if len(skeleton) != len(state.hooks):
        raise ValueError(
            f"{meta}: holds {len(skeleton)} hook states, the model has "
            f"{len(state.hooks)}; was it saved from a different adapter?"
        )
    for h, s in zip(state.hooks, skeleton, strict=True):
        h.load_state_dict(unflatten_state(s, tensors))
    return True
