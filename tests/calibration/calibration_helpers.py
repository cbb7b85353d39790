"""Tiny diffusers models and configs shared by the calibration tests (imported by name: a
module called ``conftest`` would resolve to another folder's when several test folders run in
one pytest process)."""

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel


def make_tiny_unet(seed: int = 0, cross_attention_dim: int = 8) -> UNet2DConditionModel:
    """A 2-level UNet with one cross-attention block per level (block_out_channels (8, 16))."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def make_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=True,
        clip_sample=False,
    )


def tiny_calibration_cfg(output_dir: str, **overrides):
    """A config of the TINY preset with small stage-1 settings (CPU, 64 px images)."""
    from detectron2.config import get_cfg

    from spade.config import add_spade_config

    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.merge_from_file("configs/calibration/Instant-SynthPSG.yaml")
    cfg.OUTPUT_DIR = output_dir
    cfg.MODEL.SPADE.DIFFUSION.TINY.BLOCK_OUT_CHANNELS = [16, 32, 32, 32]
    cfg.MODEL.SPADE.IMPLICIT_TEXT.HIDDEN_DIM = 32
    cfg.MODEL.SPADE.IMPLICIT_TEXT.NUM_TOKENS = 4
    cfg.CALIBRATION.NUM_INFERENCE_STEPS = 3
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, last, value)
    return cfg


def write_image(path: str, seed: int = 0, size: int = 64) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path
