"""Pixel decoders of SPADE's panoptic head (registry + multi-scale deformable-attention decoder)."""

from .build import SPADE_PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .ms_deform_attn import MSDeformAttn, ms_deform_attn_sample
from .msdeformattn import MSDeformAttnPixelDecoder  # registers MSDeformAttnPixelDecoder
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "SPADE_PIXEL_DECODER_REGISTRY",
    "build_pixel_decoder",
    "MSDeformAttn",
    "ms_deform_attn_sample",
    "MSDeformAttnPixelDecoder",
    "PositionEmbeddingSine",
]
