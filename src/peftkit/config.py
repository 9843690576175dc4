"""Adapter configurations: frozen, keyword-only dataclasses that read and write PEFT's JSON.

Field names follow Hugging Face PEFT's ``adapter_config.json`` wherever PEFT has the method, so a
config serialises to a file PEFT reads, and PEFT's files read back here. Reading is strict about
maths: a key that would change the computation and that peftkit does not implement is an error,
never silently dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="AdapterConfig")

# PEFT keys that never change the maths of a loaded adapter: bookkeeping only.
HARMLESS_KEYS = frozenset(
    {
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "task_type",
        "peft_version",
        "inference_mode",
        "megatron_core",
        "qalora_group_size",
        "fan_in_fan_out",  # peftkit detects the layout from the layer type, as PEFT forces it
        "peftkit_version",
    }
)


# Fields that choose how this run holds the adapter, not what the adapter is: never written.
RUN_ONLY_FIELDS = frozenset({"autocast_adapter_dtype"})


def _is_default_like(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == "none"


def as_tuple(value: Any, name: str, item_type: type) -> tuple[Any, ...] | None:
    if value is None:
        return None
    if isinstance(value, item_type) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        out = tuple(value)
        for v in out:
            if not isinstance(v, item_type) or isinstance(v, bool):
                raise TypeError(
                    f"{name} must hold {item_type.__name__} values, got {v!r} ({type(v).__name__})"
                )
        return out
    raise TypeError(f"{name} must be a {item_type.__name__} or a list of them, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; e.g. {name}=8")


def check_finite_number(name: str, value: Any, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_probability(name: str, value: Any) -> None:
    check_finite_number(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}; e.g. {name}=0.05")


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Fields every method shares: what to adapt and what else to train.

    ``target_modules``: a list of names matched on the name's tail (``["q_proj", "v_proj"]``), a
    single regex matched against the full module path, or ``"all-linear"`` (every linear layer but
    the output head). ``modules_to_save``: modules trained in full, as trainable copies (a
    classifier head, say). ``layers_to_transform``/``layers_pattern``: restrict to layer indices.
    ``exclude_modules``: names (tail match) or a regex never adapted.
    ``autocast_adapter_dtype``: keep the adapter in fp32 on an fp16/bf16 base (default, as PEFT);
    False keeps the base's dtype. The forward stays in the activation dtype either way. A choice
    of this run, not of the adapter: it is not written to ``adapter_config.json``.
    """

    target_modules: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    autocast_adapter_dtype: bool = True

    #: PEFT's ``peft_type`` for files of this config, or None when PEFT lacks the method.
    peft_type: ClassVar[str | None] = None
    #: keys of PEFT's config that peftkit does not implement, with their neutral value.
    unsupported_keys: ClassVar[Mapping[str, Any]] = {}

    def __post_init__(self) -> None:
        if not isinstance(self.autocast_adapter_dtype, bool):
            raise ValueError(
                f"autocast_adapter_dtype must be True or False, got {self.autocast_adapter_dtype!r}"
            )
        tm = self.target_modules
        if tm is None:
            raise ValueError(
                "target_modules is required: a list of module names such as "
                "['q_proj', 'v_proj'], a regex, or 'all-linear'"
            )
        if not isinstance(tm, str):
            tm = as_tuple(tm, "target_modules", str)
            if not tm:
                raise ValueError("target_modules is empty; name at least one module")
            object.__setattr__(self, "target_modules", tm)
        elif not tm:
            raise ValueError("target_modules is an empty string; name a module or 'all-linear'")
        object.__setattr__(
            self, "modules_to_save", as_tuple(self.modules_to_save, "modules_to_save", str)
        )
        ltt = self.layers_to_transform
        ltt = as_tuple(ltt, "layers_to_transform", int)
        if ltt is not None and any(i < 0 for i in ltt):
            raise ValueError(f"layers_to_transform must be non-negative indices, got {ltt!r}")
        object.__setattr__(self, "layers_to_transform", ltt)
        object.__setattr__(
            self, "layers_pattern", as_tuple(self.layers_pattern, "layers_pattern", str)
        )
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            object.__setattr__(
                self, "exclude_modules", as_tuple(self.exclude_modules, "exclude_modules", str)
            )

    @property
    def method(self) -> str:
        """The peftkit method name that this config builds (the registry key)."""
        raise NotImplementedError

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content: PEFT's keys, plus ``peftkit_method`` where PEFT
        lacks the method (PEFT ignores unknown keys with a warning)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in RUN_ONLY_FIELDS:
                continue
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        out["peft_type"] = self.peft_type if self.peft_type is not None else "LORA"
        if self.peft_type is None or self.method not in ("lora", "dora", "adalora", "vera"):
            out["peftkit_method"] = self.method
        out.update({k: v for k, v in self.unsupported_keys.items() if k not in out})
        out.setdefault("base_model_name_or_path", None)
        out.setdefault("task_type", None)
        out.setdefault("inference_mode", True)
        return out

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any], *, source: str = "config") -> C:
        """Build the config from a PEFT-style dict, strictly.

        Keys that are bookkeeping are ignored; keys peftkit does not implement are accepted only at
        their neutral value (null, false, empty); anything else is a ``ValueError`` naming the key.
        """
        if "peft_type" not in d:
            raise ValueError(f"{source}: missing 'peft_type'; this is not an adapter config")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in known:
                kwargs[key] = value
            elif key in HARMLESS_KEYS or key in ("peft_type", "peftkit_method"):
                continue
            elif key in cls.unsupported_keys:
                neutral = cls.unsupported_keys[key]
                if value != neutral and not _is_default_like(value):
                    raise ValueError(
                        f"{source}: {key}={value!r} changes the adapter's maths and peftkit does "
                        f"not implement it; only {neutral!r} (or null) can be loaded"
                    )
            elif not _is_default_like(value):
                raise ValueError(
                    f"{source}: unknown key {key}={value!r}; peftkit cannot tell whether it "
                    "changes the maths. Remove it if it does not."
                )
        for required in cls.required_keys():
            if required not in d:
                raise ValueError(f"{source}: missing required key {required!r}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{source}: {e}") from None

    @classmethod
    def required_keys(cls) -> tuple[str, ...]:
        return ("target_modules",)


def replace(config: C, **changes: Any) -> C:
    """A copy of ``config`` with fields changed (validated again)."""
    return dataclasses.replace(config, **changes)


__all__ = [
    "AdapterConfig",
    "check_finite_number",
    "check_positive_int",
    "check_probability",
    "field",
    "replace",
]
