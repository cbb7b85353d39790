"""Registry of SPADE pixel decoders."""

from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry

__all__ = ["SPADE_PIXEL_DECODER_REGISTRY", "build_pixel_decoder"]

SPADE_PIXEL_DECODER_REGISTRY = Registry("SPADE_PIXEL_DECODER")
SPADE_PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders of SPADE's panoptic head, selected by ``MODEL.SPADE.PIXEL_DECODER.NAME``.

Called as ``obj(cfg, input_shape)`` with ``input_shape: Dict[str, ShapeSpec]`` (the backbone's
``output_shape()``). The object must be an ``nn.Module`` with
``forward_features(features: Dict[str, Tensor]) -> (mask_features [B, MASK_DIM, H/s, W/s],
multi_scale_features: list of 3 maps [B, CONVS_DIM, h, w], coarsest first)``.
"""


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]):
    """Build the pixel decoder named by ``cfg.MODEL.SPADE.PIXEL_DECODER.NAME``."""
    name = cfg.MODEL.SPADE.PIXEL_DECODER.NAME
    decoder = SPADE_PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(decoder, "forward_features", None)):
        raise ValueError(f"pixel decoder {name} has no forward_features method")
    return decoder
