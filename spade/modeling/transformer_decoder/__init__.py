"""Masked-attention transformer decoder of SPADE's panoptic head."""

from .layers import (
    MLP,
    CrossAttentionLayer,
    FFNLayer,
    SelfAttentionLayer,
    attention_mask_from_logits,
)
from .masked_decoder import MaskedAttentionDecoder

__all__ = [
    "MaskedAttentionDecoder",
    "CrossAttentionLayer",
    "SelfAttentionLayer",
    "FFNLayer",
    "MLP",
    "attention_mask_from_logits",
]
