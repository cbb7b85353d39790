"""Stage 0: the miniature world's foundation models (tiny CLIP, VAE, text-to-image UNet).

Pretrained on the project's own caption corpus and exported in the formats of the real models
(open_clip hub folder; diffusers Stable Diffusion folder), so every SynthPSG config loads them
through the same keys and loaders as SD 1.5 and CLIP ViT-L/14.
"""

from . import tasks  # noqa: F401  (registers the clip / vae / unet tasks)
from .config import add_pretrain_config
from .run import measure_and_record_gates, run_pretraining, setup_pretrain_cfg

__all__ = [
    "add_pretrain_config",
    "run_pretraining",
    "setup_pretrain_cfg",
    "measure_and_record_gates",
]
