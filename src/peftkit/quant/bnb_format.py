"""Read and write one linear layer in bitsandbytes' serialized 4-bit NF4 format.

bitsandbytes' ``Linear4bit`` (and transformers' ``save_pretrained`` of a 4-bit model) stores, under
the module prefix: ``weight`` (uint8 packed codes), ``weight.absmax``, ``weight.quant_map``, with
double quantization ``weight.nested_absmax`` and ``weight.nested_quant_map``, the JSON blob
``weight.quant_state.bitsandbytes__nf4`` (uint8 UTF-8 of ``quant_type, blocksize, dtype, shape``
and ``nested_blocksize, nested_dtype, nested_offset``), and ``bias``. Note: loading is a function
rather than ``NF4Linear._load_from_state_dict`` so that ``NF4Linear``'s own state dict stays strict
and the foreign layout is converted in exactly one visible place.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from .linear import NF4Linear
from .nf4 import BLOCKSIZES, DYNAMIC_CODEBOOK, NF4_CODEBOOK, NF4Tensor

__all__ = ["nf4_linear_from_bnb_state", "nf4_linear_to_bnb_state"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BNB_KEYS = {
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
    "bias",
}


def _expect(key: str, t: Tensor, dtype: torch.dtype, numel: int, why: str) -> None:
    if t.dtype != dtype or t.numel() != numel:
        raise ValueError(
            f"bitsandbytes state: {key!r} should be {dtype} with {numel} elements ({why}), got "
            f"{t.dtype} with shape {tuple(t.shape)}"
        )


def nf4_linear_from_bnb_state(
    prefix_state: dict[str, Tensor],
    bias: Tensor | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
) -> NF4Linear:
    """Build an NF4Linear from one layer of a bitsandbytes/transformers 4-bit NF4 checkpoint.

    ``prefix_state`` holds that layer's keys with the module prefix stripped: ``weight``,
    ``weight.absmax``, ``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4`` (uint8 JSON),
    with double quantization also ``weight.nested_absmax`` and ``weight.nested_quant_map``, and
    optionally ``bias`` (or pass ``bias``). Unknown keys, a non-NF4 quant type, a codebook that is
    not NF4 / the dynamic map, and any size that disagrees with the recorded shape are errors
    naming the key. The dequantized weight is bit-identical to bitsandbytes'.
    """
    unknown = sorted(set(prefix_state) - _BNB_KEYS)
    if unknown:
        raise ValueError(
            f"bitsandbytes state: unexpected keys {unknown}; pass one layer's keys with the "
            "module prefix stripped (an fp4 checkpoint is not supported: NF4 only)"
        )
    for key in (
        "weight",
        "weight.absmax",
        "weight.quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    ):
        if key not in prefix_state:
            raise ValueError(f"bitsandbytes state: missing key {key!r}")
    blob = prefix_state["weight.quant_state.bitsandbytes__nf4"]
    meta = json.loads(bytes(blob.to(torch.uint8).tolist()).decode("utf-8"))
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"bitsandbytes state: quant_type {meta.get('quant_type')!r} is not 'nf4'")
    shape = meta.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"bitsandbytes state: shape {shape!r} is not a 2-D (out, in) weight")
    if meta.get("dtype") not in _DTYPES:
        raise ValueError(
            f"bitsandbytes state: dtype {meta.get('dtype')!r} is not one of {list(_DTYPES)}"
        )
    blocksize = meta.get("blocksize")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"bitsandbytes state: blocksize {blocksize!r} is not one of {BLOCKSIZES}")
    out_features, in_features = shape
    n = out_features * in_features
    n_blocks = -(-n // blocksize)
    double_quant = "nested_offset" in meta
    if double_quant != ("weight.nested_absmax" in prefix_state):
        raise ValueError(
            "bitsandbytes state: 'weight.nested_absmax' and the JSON's nested_offset must be "
            "both present (double quantization) or both absent"
        )
    if double_quant and (meta.get("nested_blocksize"), meta.get("nested_dtype")) != (
        256,
        "float32",
    ):
        raise ValueError(
            f"bitsandbytes state: nested_blocksize/nested_dtype {meta.get('nested_blocksize')!r}/"
            f"{meta.get('nested_dtype')!r} are not 256/'float32'"
        )
    packed = prefix_state["weight"].contiguous()
    if packed.dtype != torch.uint8:  # quant_storage other than uint8 holds the same bytes
        packed = packed.view(-1).view(torch.uint8)
    _expect("weight", packed, torch.uint8, (n + 1) // 2, f"two codes per byte for shape {shape}")
    quant_map = prefix_state["weight.quant_map"]
    if not torch.equal(quant_map.float().cpu(), NF4_CODEBOOK):
        raise ValueError("bitsandbytes state: 'weight.quant_map' is not the NF4 codebook")
    absmax = prefix_state["weight.absmax"]
    why = f"{n_blocks} blocks of {blocksize}"
    _expect("weight.absmax", absmax, torch.uint8 if double_quant else torch.float32, n_blocks, why)
    layer = NF4Linear(
        in_features,
        out_features,
        bias=bias is not None or "bias" in prefix_state,
        blocksize=blocksize,
        double_quant=double_quant,
        weight_dtype=_DTYPES[meta["dtype"]],
        compute_dtype=compute_dtype,
        device=packed.device,
    )
    nested = offset = None
    if double_quant:
        nested = prefix_state["weight.nested_absmax"]
        n_super = -(-n_blocks // 256)
        _expect("weight.nested_absmax", nested, torch.float32, n_super, f"{n_super} superblocks")
        nested_map = prefix_state.get("weight.nested_quant_map")
        if nested_map is None or not torch.equal(nested_map.float().cpu(), DYNAMIC_CODEBOOK):
            raise ValueError(
                "bitsandbytes state: 'weight.nested_quant_map' is missing or not the 8-bit "
                "dynamic map"
            )
        offset = torch.tensor(
            float(meta["nested_offset"]), dtype=torch.float32, device=packed.device
        )
    nested = None if nested is None else nested.reshape(-1)
    packed, absmax = packed.reshape(-1, 1), absmax.reshape(-1)
    shape_t = torch.Size(shape)
    layer._set_nf4(
        NF4Tensor(packed, absmax, shape_t, layer.weight_dtype, blocksize, nested, offset)
    )
    b = bias if bias is not None else prefix_state.get("bias")
    if b is not None and layer.bias is not None:
        if tuple(b.shape) != (out_features,):
            raise ValueError(
                f"bitsandbytes state: 'bias' has shape {tuple(b.shape)}, expected ({out_features},)"
            )
        layer.bias.data = b.detach().clone()
    return layer


def nf4_linear_to_bnb_state(layer: NF4Linear) -> dict[str, Tensor]:
    """The layer's keys as bitsandbytes' ``Linear4bit`` saves them.

    That is ``QuantState.as_dict(packed=True)`` under ``weight.``, plus ``bias``; prefix the keys
    with the module path to build a checkpoint."""
    meta: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": layer.blocksize,
        "dtype": str(layer.weight_dtype).removeprefix("torch."),
        "shape": [layer.out_features, layer.in_features],
    }
    state = {
        "weight": layer.weight,
        "weight.absmax": layer.weight_absmax,
        "weight.quant_map": NF4_CODEBOOK.to(layer.weight.device),
    }
    if layer.weight_nested_absmax is not None and layer.weight_offset is not None:
        meta.update(nested_blocksize=256, nested_dtype="float32")
        meta["nested_offset"] = layer.weight_offset.item()
        state["weight.nested_absmax"] = layer.weight_nested_absmax
        state["weight.nested_quant_map"] = DYNAMIC_CODEBOOK.clone().to(layer.weight.device)
    blob = json.dumps(meta).encode("utf-8")
    state["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
    if layer.bias is not None:
        state["bias"] = layer.bias.detach()
    return state
