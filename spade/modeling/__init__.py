"""SPADE's models. Importing this package registers them with detectron2's registries."""

from . import (
    backbone,  # noqa: F401  (diffusion parts, LoRA, implicit text encoder)
    pixel_decoder,  # noqa: F401  registers SPADE_PIXEL_DECODER "MSDeformAttnPixelDecoder"
    relation,
)  # noqa: F401  registers SPADE_RELATION_HEAD "RGTRelationHead", "PairMLPRelationHead"
from .backbone import (
    diffusion_backbone,
)  # noqa: F401  registers BACKBONE "build_diffusion_backbone"
from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .meta_arch import SPADE  # registers META_ARCH "SPADE"
from .transformer_decoder import MaskedAttentionDecoder

__all__ = ["SPADE", "SetCriterion", "HungarianMatcher", "MaskedAttentionDecoder"]
