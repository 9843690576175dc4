"""The method record: what a method file declares so the core can build, save and train it."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..core import Adapter, TrainingHook

V = TypeVar("V")


@dataclass(frozen=True)
class LayerSpec:
    """Where a layer sits: its module path and, when the method made one, the shared module."""

    name: str
    shared: nn.Module | None = None

    def pattern_value(self, pattern: Mapping[str, V], default: V) -> V:
        """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key that matches the
        module path's tail as a regex (``(.*\\.)?key$``) wins."""
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", self.name):
                return value
        return default


@dataclass(frozen=True)
class Method:
    """One method of the family.

    ``make_layer(base, config, spec)`` wraps one target; ``prepare(model, config, targets)`` may
    return a module of state shared by all layers (VeRA's projections), registered on the model;
    ``make_hook(model, config, layers)`` may return the method's :class:`TrainingHook`;
    ``check(model, config, targets)`` may refuse a model (e.g. an NF4 base) with a clear error;
    ``on_save``/``on_load`` adapt the files (below);
    ``reads(config_dict)`` says whether an ``adapter_config.json`` belongs to this method.
    """

    name: str
    config_cls: type[AdapterConfig]
    make_layer: Callable[[nn.Module, Any, LayerSpec], Adapter]
    reads: Callable[[Mapping[str, Any]], bool]
    prepare: (
        Callable[[nn.Module, Any, Sequence[tuple[str, nn.Module]]], nn.Module | None] | None
    ) = None
    make_hook: (
        Callable[[nn.Module, Any, Sequence[tuple[str, Adapter]]], TrainingHook | None] | None
    ) = None
    check: Callable[[nn.Module, Any, Sequence[tuple[str, nn.Module]]], None] | None = None
    #: ``on_save(model, config_dict, tensors)`` may edit what is written (AdaLoRA prunes);
    #: ``on_load(model, config_dict, tensors) -> tensors`` may prepare layers before loading.
    on_save: Callable[[nn.Module, dict[str, Any], dict[str, Tensor]], None] | None = None
    on_load: Callable[[nn.Module, dict[str, Any], dict[str, Tensor]], dict[str, Tensor]] | None = (
        None
    )
    #: True when training changes the frozen base weight itself (Delta-LoRA): training
    #: checkpoints then keep the adapted layers' base weights too.
    mutates_base: bool = False
