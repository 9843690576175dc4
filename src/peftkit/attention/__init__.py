"""Attention patterns used during training (S2-Attn of LongLoRA)."""

from peftkit.attention.s2 import s2_attention, shift, unshift

__all__ = ["s2_attention", "shift", "unshift"]
