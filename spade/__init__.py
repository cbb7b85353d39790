"""SPADE: Spatial-Aware Denoising Network for open-vocabulary panoptic scene graph generation.

Importing ``spade`` registers its datasets, backbone, meta-architecture and heads with detectron2.
"""

from . import (
    data,  # noqa: F401  (registers the PSG / VG150 / SynthPSG datasets and the mapper)
    modeling,  # noqa: F401  (registers the diffusion backbone, SPADE, pixel decoder, heads)
)
from .config import add_spade_config

__version__ = "0.1.0"

__all__ = ["add_spade_config", "__version__"]
