"""TRL integration: a DPO (or KTO, ORPO-style) reference model that is the policy itself with its
adapters switched off, so no second copy of the weights is ever loaded.

    from peftkit.integrations.trl import reference
    trainer = DPOTrainer(model=policy, ref_model=reference(policy), args=..., ...)

TRL's own shortcut (``ref_model=None``) recognises only PEFT's ``PeftModel``; for any other model it
loads a second full model from ``config._name_or_path`` (the dense checkpoint even when the policy's
base is NF4, so the reference is not the policy's base; and it fails for a model built from a
config). :func:`reference` gives TRL what it calls on a reference model — ``forward``,
``base_model`` (the backbone, for its fused LM head), ``get_output_embeddings``, ``config`` — each
running the policy inside :func:`peftkit.disable_adapters`. At the first step the policy equals
its base (B = 0), so the DPO margin is exactly 0 and the loss exactly ln 2.

The reference holds no parameters and no buffers: the policy is a plain attribute, not a
submodule, so ``reference.parameters()`` is empty, ``.to()``/``.eval()`` on it touch nothing, and
accelerate's ``prepare_model`` has nothing to place. No module of the policy is changed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core import AdaptedLayer, ModulesToSave, disable_adapters, get_state, unwrap


class _Disabled(nn.Module):
    """Calls ``module`` with every adapter of ``policy`` switched off; holds neither."""

    def __init__(self, policy: nn.Module, module: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_policy", policy)
        object.__setattr__(self, "_module", module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with disable_adapters(self._policy):
            return self._module(*args, **kwargs)


class Reference(_Disabled):
    """The policy with its adapters off, as a reference model for TRL (see the module)."""

    def __init__(self, policy: nn.Module) -> None:
        root = unwrap(policy)
        get_state(root)  # an adapted model, or a one-line error
        super().__init__(root, root)
        self.config = getattr(root, "config", None)
        self.generation_config = getattr(root, "generation_config", None)

    @property
    def base_model(self) -> nn.Module:
        """The policy's backbone (``model.model`` for a causal LM), run with adapters off."""
        backbone = getattr(self._policy, "base_model", None)
        if not isinstance(backbone, nn.Module):
            raise AttributeError(f"{type(self._policy).__name__} has no base_model (backbone)")
        return _Disabled(self._policy, backbone)

    def get_output_embeddings(self) -> nn.Module | None:
        """The policy's output head as the base model has it: an adapted head's frozen ``base``,
        a ``modules_to_save`` head's frozen original."""
        get = getattr(self._policy, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if isinstance(head, AdaptedLayer):
            if any(a.merged for a in head.adapters.values()):
                raise ValueError(
                    "the policy's output head holds a merged adapter; unmerge(model) before "
                    "using it as a reference"
                )
            return head.base
        if isinstance(head, ModulesToSave):
            return head.original
        return head if isinstance(head, nn.Module) else None

    def get_input_embeddings(self) -> nn.Module | None:
        get = getattr(self._policy, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        if isinstance(emb, AdaptedLayer):
            return emb.base
        if isinstance(emb, ModulesToSave):
            return emb.original
        return emb if isinstance(emb, nn.Module) else None

    @property
    def device(self) -> Any:
        return getattr(self._policy, "device", None)

    @property
    def dtype(self) -> Any:
        return getattr(self._policy, "dtype", None)

    def extra_repr(self) -> str:
        return f"policy={type(self._policy).__name__} with adapters disabled"


def reference(policy: nn.Module) -> Reference:
    """A reference model for TRL's ``DPOTrainer(ref_model=...)``: ``policy`` with its adapters
    disabled, sharing every weight (see the module)."""
    return Reference(policy)


__all__ = ["Reference", "reference"]
