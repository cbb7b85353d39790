"""Tiny-model fixtures for the backbone / LoRA / open-vocabulary tests (and anyone who needs them).

Every model is the TINY preset built from the config (seeded), so fixtures are deterministic and
build in well under a second on one core.
"""

import pytest
import torch
from detectron2.config import get_cfg

from spade.config import add_spade_config
from spade.modeling.backbone.loading import build_clip, build_diffusion_parts


def make_spade_cfg(**model_overrides):
    """A fresh detectron2 config with SPADE keys (TINY preset, small projections).

    ``model_overrides`` are dotted paths under MODEL.SPADE, e.g. ``{"LORA.RANK": 2}`` given as
    ``make_spade_cfg(**{"LORA.RANK": 2})``.
    """
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SPADE.DIFFUSION.OUT_CHANNELS = 32
    cfg.MODEL.SPADE.IMPLICIT_TEXT.HIDDEN_DIM = 64
    for key, value in model_overrides.items():
        node = cfg.MODEL.SPADE
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.fixture
def spade_cfg():
    return make_spade_cfg()


@pytest.fixture
def tiny_diffusion(spade_cfg):
    """DiffusionParts of the TINY preset (frozen VAE, UNet, DDIM scheduler)."""
    return build_diffusion_parts(spade_cfg)


@pytest.fixture
def tiny_clip(spade_cfg):
    """ClipParts of the TINY preset (2-layer open_clip CLIP with its BPE tokenizer)."""
    return build_clip(spade_cfg)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def make_cfg():
    """The :func:`make_spade_cfg` factory, for tests that need several configs."""
    return make_spade_cfg
