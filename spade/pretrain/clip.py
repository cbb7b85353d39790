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
    "hard_negative_clip_loss",
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
    """open_clip CLIP + symmetric InfoNCE; ``forward(batch)`` returns ``{"loss_contrastive": ...}``.

    batch: dict with ``images`` float [B, 3, S, S] (CLIP-normalised) and ``texts`` long [B, 77];
    optionally ``neg_texts`` long [M, 77] with ``neg_owner`` long [M]: hard-negative captions,
    each false for the one image ``neg_owner`` names. Without negatives the loss is open_clip's
    ``ClipLoss``. With them, each image's row of the image->text logits also holds its own
    negatives (and only its own: a caption swapped for image j may be true of image i), the
    text->image side is unchanged, and ``hard_negative_acc`` (the share of images whose caption
    beats all its negatives) is logged. Negatives are per process: with several processes the
    in-batch contrast is the local batch.
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
        neg_texts = batch.get("neg_texts")
        if neg_texts is None or len(neg_texts) == 0:
            loss = self.loss(image_features, text_features, logit_scale)
            extra = {}
        else:
            neg_features = self.clip.encode_text(neg_texts.to(device), normalize=True)
            loss, extra = hard_negative_clip_loss(
                image_features,
                text_features,
                neg_features,
                batch["neg_owner"].to(device),
                logit_scale,
            )
        if self.training:
            from detectron2.utils.events import get_event_storage

            storage = get_event_storage()
            storage.put_scalar("logit_scale", float(logit_scale.detach()), smoothing_hint=False)
            for name, value in extra.items():
                storage.put_scalar(name, value)
        return {"loss_contrastive": loss}


def hard_negative_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    neg_features: torch.Tensor,
    neg_owner: torch.Tensor,
    logit_scale: torch.Tensor,
):
    """Symmetric InfoNCE whose image->text side also ranks each image's own hard negatives.

    image/text features [B, D] and negatives [M, D] are L2-normalised; ``neg_owner`` [M] is the
    image each negative belongs to. Returns (loss, {"hard_negative_acc": float}); with M = 0 the
    loss equals ``ClipLoss``'s.
    """
    n = len(image_features)
    labels = torch.arange(n, device=image_features.device)
    logits = logit_scale * image_features @ text_features.T  # [B, B]
    own = logit_scale * (image_features[neg_owner] * neg_features).sum(-1)  # [M]
    extra = logits.new_full((n, len(neg_features)), float("-inf"))
    extra[neg_owner, torch.arange(len(neg_features), device=extra.device)] = own
    loss_i2t = F.cross_entropy(torch.cat([logits, extra], dim=1), labels)
    loss_t2i = F.cross_entropy(logits.T, labels)
    acc = 0.0
    if len(neg_features):
        with torch.no_grad():
            owners = torch.unique(neg_owner)
            hardest = extra.max(dim=1).values[owners]
            acc = float((logits.diagonal()[owners] > hardest).float().mean())
    return (loss_i2t + loss_t2i) / 2, {"hard_negative_acc": acc}


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
    corpus: Corpus,
    batch_size: int,
    image_size: int,
    crop_prob: float,
    seed: int,
    negatives: int = 0,
    worker: int = 0,
    num_workers: int = 1,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Endless seeded batches of (image or one-thing crop, caption) pairs from the corpus, with
    ``negatives`` shape-swapped captions per crop (``neg_texts`` / ``neg_owner``).

    ``worker`` of ``num_workers`` (data-loader workers of this process) takes every
    ``num_workers``-th image of this rank's stream and its own batch generator; one worker
    reproduces the single-process stream exactly.
    """
    tokenizer = open_clip.get_tokenizer("ViT-L-14")  # the unchanged open_clip BPE tokenizer
    shard = comm.get_rank() * num_workers + worker
    stream = corpus.iter_indices(seed, shard, comm.get_world_size() * num_workers)
    step = 0
    while True:
        key = [seed, step, 7] if num_workers == 1 else [seed, step, 7, worker]
        rng = np.random.default_rng(key)
        images: List[np.ndarray] = []
        texts: List[str] = []
        neg_texts: List[str] = []
        neg_owner: List[int] = []
        for b in range(batch_size):
            i, epoch = next(stream)
            if rng.random() < crop_prob:
                crop, caption, _, negs = corpus.thing_crop(i, epoch, negatives=negatives)
                images.append(crop)
                texts.append(caption)
                neg_texts += negs
                neg_owner += [b] * len(negs)
            else:
                images.append(corpus.image(i))
                texts.append(corpus.caption(i, epoch))
        batch = {
            "images": to_clip_input(images, image_size),
            "texts": tokenizer(texts),
            "captions": texts,
        }
        if negatives:
            batch["neg_texts"] = (
                tokenizer(neg_texts) if neg_texts else torch.zeros(0, CONTEXT_LENGTH).long()
            )
            batch["neg_owner"] = torch.tensor(neg_owner, dtype=torch.long)
        yield batch
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
