"""NF4 base storage for QLoRA: pure tensor functions (``nf4``) and the ``NF4Linear`` module."""

from .bnb_format import nf4_linear_from_bnb_state, nf4_linear_to_bnb_state
from .linear import NF4Linear, quantize_
from .nf4 import (
    BLOCKSIZES,
    DYNAMIC_CODEBOOK,
    FP4_CODEBOOK,
    NF4_CODEBOOK,
    NF4Tensor,
    nf4_dequantize,
    nf4_quantize,
)

__all__ = [
    "BLOCKSIZES",
    "DYNAMIC_CODEBOOK",
    "FP4_CODEBOOK",
    "NF4_CODEBOOK",
    "NF4Linear",
    "NF4Tensor",
    "nf4_dequantize",
    "nf4_linear_from_bnb_state",
    "nf4_linear_to_bnb_state",
    "nf4_quantize",
    "quantize_",
]
