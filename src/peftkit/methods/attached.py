"""A warning for hook-driven methods that train without their hook.

AdaLoRA's budget, Delta-LoRA's update of W and LoRA-FA's gradient correction run in a
:class:`~peftkit.TrainingHook` that :func:`peftkit.attach` (or the HF Trainer's
``PeftkitCallback``) puts on the optimizer. Without it such a method trains as a plain LoRA and
says nothing until much later (AdaLoRA fails only at ``save_adapter``). ``make_hook`` marks its
layers as expecting the hook; the hook's ``on_attach`` marks them attached; a layer still
unattached at a training forward (train mode, grad on) warns, once per message, as DyLoRA's and
DoRA-Mao's layers do.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn


def unattached_message(method: str, consequence: str) -> str:
    return (
        f"a {method} layer ran a training forward before peftkit.attach(optimizer, model): "
        f"{consequence}. Call peftkit.attach(optimizer, model) before training (under the HF "
        "Trainer, add peftkit.integrations.hf.PeftkitCallback())."
    )


def expect_hook(layers: Iterable[nn.Module]) -> None:
    """Mark ``layers`` as driven by a training hook that is not attached yet."""
    for layer in layers:
        layer.hooked = False


def mark_attached(layers: Iterable[nn.Module]) -> None:
    """Called from the hook's ``on_attach``."""
    for layer in layers:
        layer.hooked = True


def warn_if_unattached(layer: nn.Module, message: str) -> None:
    """Warn when ``layer`` expects a hook, none is attached, and this is a training forward."""
    if getattr(layer, "hooked", None) is False and layer.training and torch.is_grad_enabled():
        warnings.warn(message, stacklevel=3)
