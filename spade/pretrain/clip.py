"""Tiny CLIP: contrastive pretraining on the caption corpus, saved in open_clip's hub format.

The model is open_clip's own ``CLIP`` built from a model config (``PRETRAIN.CLIP``), trained with
open_clip's symmetric InfoNCE loss (``open_clip.loss.ClipLoss``, learnable temperature) and the
unchanged open_clip tokenizer. The export is the folder layout of a CLIP on the Hugging Face hub
(``open_clip_config.json`` with ``model_cfg`` + ``preprocess_cfg``, and
``open_clip_model.safetensors``),
which open_clip reads with ``create_model("local-dir:<folder>")`` — the path SPADE's loader takes
for every CLIP folder, ViT-L/14 included.

The vision tower pools by averaging its patch tokens (``pool_type="avg"``, LayerNorm before the
pool), so the image embedding is the mean of exactly the dense features that stage 2 pools under
masks (``clip_dense_features``): what the contrastive loss aligns with text is what stage 2 reads.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, List

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from detectron2.utils import comm
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.loss import ClipLoss
from torch import nn

from spade.utils.io import atomic_save_safetensors, atomic_write_json

from .corpus import Corpus

__all__ = [
    "clip_model_config",
    "clip_preprocess_config",
    "ClipPretrainModel",
    "clip_batches",
    "export_open_clip",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
CONTEXT_LENGTH = 77  # CLIP's (and SD 1.5's) text context
VOCAB_SIZE = 49408  # open_clip's BPE tokenizer


def clip_model_config(cfg) -> dict:
    """open_clip ``model_cfg`` of the tiny CLIP (the content of open_clip_config.json)."""
    c = cfg.PRETRAIN.CLIP
    for key in ("VISION_WIDTH", "TEXT_WIDTH"):
        if int(c[key]) % int(c.HEAD_WIDTH):
            raise ValueError(
                f"PRETRAIN.CLIP.{key}={c[key]} is not a multiple of PRETRAIN.CLIP.HEAD_WIDTH"
            )
    if int(c.IMAGE_SIZE) % int(c.PATCH_SIZE):
        raise ValueError("PRETRAIN.CLIP.IMAGE_SIZE must be a multiple of PRETRAIN.CLIP.PATCH_SIZE")
    return {
        "embed_dim": int(c.EMBED_DIM),
        "vision_cfg": {
            "image_size": int(c.IMAGE_SIZE),
            "layers": int(c.VISION_LAYERS),
            "width": int(c.VISION_WIDTH),
            "head_width": int(c.HEAD_WIDTH),
            "patch_size": int(c.PATCH_SIZE),
            "pool_type": str(c.VISION_POOL),
        },
        "text_cfg": {
            "context_length": CONTEXT_LENGTH,
            "vocab_size": VOCAB_SIZE,
            "width": int(c.TEXT_WIDTH),
            "heads": int(c.TEXT_WIDTH) // int(c.HEAD_WIDTH),
            "layers": int(c.TEXT_LAYERS),
        },
    }


def clip_preprocess_config(cfg) -> dict:
    """open_clip ``preprocess_cfg``: OpenAI normalisation, squash-resize to IMAGE_SIZE."""
    return {
        "size": int(cfg.PRETRAIN.CLIP.IMAGE_SIZE),
        "mode": "RGB",
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
        "interpolation": "bilinear",
        "resize_mode": "squash",
        "fill_color": 0,
    }


class ClipPretrainModel(nn.Module):
    """open_clip CLIP + ClipLoss; ``forward(batch)`` returns ``{"loss_contrastive": ...}``.

    batch: dict with ``images`` float [B, 3, S, S] (CLIP-normalised) and ``texts`` long [B, 77].
    """

    def __init__(self, model_cfg: dict, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.clip = open_clip.CLIP(**model_cfg)
        self.loss = ClipLoss()

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        device = self.clip.logit_scale.device
        image_features = self.clip.encode_image(batch["images"].to(device), normalize=True)
        text_features = self.clip.encode_text(batch["texts"].to(device), normalize=True)
        # CLIP clamps the learned temperature at 100
        logit_scale = self.clip.logit_scale.clamp(max=np.log(100.0)).exp()
        loss = self.loss(image_features, text_features, logit_scale)
        if self.training:
            from detectron2.utils.events import get_event_storage

            get_event_storage().put_scalar(
                "logit_scale", float(logit_scale.detach()), smoothing_hint=False
            )
        return {"loss_contrastive": loss}


def to_clip_input(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] (or a list of differently sized crops) -> normalised [B, 3, S, S]."""
    tensors = []
    for im in images:
        t = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255.0
        tensors.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True))
    x = torch.cat(tensors)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_batches(
    corpus: Corpus, batch_size: int, image_size: int, crop_prob: float, seed: int
) -> Iterator[Dict[str, torch.Tensor]]:
    """Endless seeded batches of (image or one-thing crop, caption) pairs from the corpus."""
    tokenizer = open_clip.get_tokenizer("ViT-L-14")  # the unchanged open_clip BPE tokenizer
    stream = corpus.iter_indices(seed, comm.get_rank(), comm.get_world_size())
    step = 0
    while True:
        rng = np.random.default_rng([seed, step, 7])
        images: List[np.ndarray] = []
        texts: List[str] = []
        for _ in range(batch_size):
            i, epoch = next(stream)
            if rng.random() < crop_prob:
                crop, caption, _ = corpus.thing_crop(i, epoch)
                images.append(crop)
                texts.append(caption)
            else:
                images.append(corpus.image(i))
                texts.append(corpus.caption(i, epoch))
        yield {
            "images": to_clip_input(images, image_size),
            "texts": tokenizer(texts),
            "captions": texts,
        }
        step += 1


def export_open_clip(clip: nn.Module, model_cfg: dict, preprocess_cfg: dict, folder: str) -> str:
    """Write ``folder/open_clip_config.json`` + ``folder/open_clip_model.safetensors`` (fp16).

    Token-embedding rows the tokenizer never produced for the corpus stay at their random init;
    they are stored like every other weight (open_clip's loader expects the full table).
    Returns the weights path.
    """
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().to(torch.float16) for k, v in clip.state_dict().items()}
    weights = os.path.join(folder, WEIGHTS_NAME)
    atomic_save_safetensors(state, weights, metadata={"format": "pt"})
    atomic_write_json(
        os.path.join(folder, CONFIG_NAME),
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
        indent=2,
    )
    return weights
