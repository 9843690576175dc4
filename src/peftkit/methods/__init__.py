"""The method registry: an explicit tuple, one file per method. Adding a method is one file, one
line here and one row in the contract-test table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import adalora, delta_lora, dora, dora_dynamic, dylora, longlora, lora, lora_fa, mora, vera
from .registry import LayerSpec, Method

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        lora.METHOD,
        dora.METHOD,
        vera.METHOD,
        mora.METHOD,
        dylora.METHOD,
        dora_dynamic.METHOD,
        adalora.METHOD,
        lora_fa.METHOD,
        delta_lora.METHOD,
        longlora.METHOD,
    )
}
"""The method registry: peftkit's method name (``"lora"``, ``"dora"``, ``"vera"``, ``"mora"``,
``"dylora"``, ``"dora_dynamic"``, ``"adalora"``, ``"lora_fa"``, ``"delta_lora"``,
``"longlora"``) → its :class:`~peftkit.methods.registry.Method` record (config class, layer
factory, optional shared state, training hook and file adapters). Built from an explicit tuple:
adding a method is one file and one line here."""


def method_for_dict(d: Mapping[str, Any], *, source: str = "config") -> Method:
    """The method whose files look like ``d`` (an ``adapter_config.json``)."""
    if "peft_type" not in d:
        raise ValueError(f"{source}: missing 'peft_type'; this is not an adapter config")
    found = [m for m in METHODS.values() if m.reads(d)]
    if len(found) != 1:
        tag = d.get("peftkit_method") or d.get("peft_type")
        raise ValueError(
            f"{source}: peftkit has no method for peft_type={d.get('peft_type')!r}"
            + (f", peftkit_method={d['peftkit_method']!r}" if "peftkit_method" in d else "")
            + f" ({tag!r}); known methods: {', '.join(sorted(METHODS))}"
        )
    return found[0]


__all__ = ["METHODS", "LayerSpec", "Method", "method_for_dict"]
