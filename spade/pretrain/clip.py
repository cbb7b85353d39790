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
from typing import Dict, Iterator, List, Tuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from detectron2.utils import comm
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.loss import ClipLoss
from torch import nn

from spade.data.synthpsg import STUFF_CLASSES, THING_CLASSES
from spade.modeling.backbone.diffusion_backbone import clip_patch_embeddings
from spade.modeling.open_vocab import mask_pool
from spade.utils.io import atomic_save_safetensors, atomic_write_json

from .corpus import Corpus

__all__ = [
    "clip_model_config",
    "clip_preprocess_config",
    "ClipPretrainModel",
    "clip_batches",
    "hard_negative_clip_loss",
    "region_loss",
    "text_tower_parameters",
    "REGION_VOCABULARY",
    "export_open_clip",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
CONTEXT_LENGTH = 77  # CLIP's (and SD 1.5's) text context
# the region loss ranks each segment among every class name of the corpus (novel ones included:
# the miniature world's web data covers them, as real CLIP's covers PSG's)
REGION_VOCABULARY = tuple(THING_CLASSES) + tuple(STUFF_CLASSES)
REGION_TEMPLATES = ("{}", "a {}", "a photo of a {}.", "a picture of a {}.", "this is a {}.")
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

    def __init__(
        self, model_cfg: dict, seed: int = 0, region_weight: float = 0.0, train_text: bool = True
    ):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.clip = open_clip.CLIP(**model_cfg)
        self.loss = ClipLoss()
        self.region_weight = float(region_weight)
        self.train_text = bool(train_text)
        if not self.train_text:
            for p in text_tower_parameters(self.clip):
                p.requires_grad_(False)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        device = self.clip.logit_scale.device
        images = batch["images"].to(device)
        # CLIP clamps the learned temperature at 100
        logit_scale = self.clip.logit_scale.clamp(max=np.log(100.0)).exp()
        losses, logs = {}, {}
        if self.region_weight > 0 and "region_masks" in batch:
            dense = clip_patch_embeddings(self.clip.visual, images)  # [B, D, g, g]
            image_features = self._pool_image(dense, images)
            losses["loss_region"], logs["region_acc"] = region_loss(
                dense,
                batch["region_masks"].to(device),
                batch["region_labels"].to(device),
                self.encode_text(batch["region_texts"].to(device)),
                logit_scale,
            )
            losses["loss_region"] = losses["loss_region"] * self.region_weight
        else:
            image_features = self.clip.encode_image(images, normalize=True)
        text_features = self.encode_text(batch["texts"].to(device))
        neg_texts = batch.get("neg_texts")
        if neg_texts is None or len(neg_texts) == 0:
            loss = self.loss(image_features, text_features, logit_scale)
            extra = {}
        else:
            neg_features = self.encode_text(neg_texts.to(device))
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
            for name, value in {**extra, **logs}.items():
                storage.put_scalar(name, value)
        return {"loss_contrastive": loss, **losses}

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            return self.clip.encode_text(tokens, normalize=True)

    def _pool_image(self, dense: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The image embedding from the dense map when the tower average-pools it (the shipped
        layout: ln_post before the pool, so the mean of the dense features is the embedding);
        otherwise the tower's own pooling."""
        visual = self.clip.visual
        if getattr(visual, "pool_type", "") == "avg" and not getattr(
            visual, "final_ln_after_pool", True
        ):
            return F.normalize(dense.mean(dim=(2, 3)), dim=-1)
        return self.clip.encode_image(images, normalize=True)


def text_tower_parameters(clip: nn.Module) -> List[nn.Parameter]:
    """The parameters of open_clip CLIP's text tower (everything but ``visual`` and the shared
    ``logit_scale``/``logit_bias``): what the UNet's conditioning and stage 2's text classifiers
    read, so a fine-tune that keeps them keeps the UNet valid."""
    return [
        p
        for name, p in clip.named_parameters()
        if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias")
    ]


def region_loss(
    dense: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    vocabulary: torch.Tensor,
    logit_scale: torch.Tensor,
):
    """Region-level contrast: each segment's mask-pooled dense feature (what stage 2 pools) is
    classified among the text embeddings of the whole vocabulary.

    dense [B, D, g, g]; masks [B, S, g, g] soft segment masks on the grid (padding rows zero);
    labels long [B, S] vocabulary index (-1 = padding); vocabulary [V, D] L2-normalised.
    Returns (cross-entropy over the real segments, their top-1 accuracy); (0, 0) without any.
    """
    valid = labels >= 0
    if not bool(valid.any()):
        return dense.sum() * 0.0, 0.0
    pooled = F.normalize(mask_pool(dense, masks), dim=-1)[valid]  # [N, D]
    logits = logit_scale * pooled @ vocabulary.T
    target = labels[valid]
    acc = float((logits.argmax(dim=-1) == target).float().mean())
    return F.cross_entropy(logits, target), acc


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
    region_grid: int = 0,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Endless seeded batches of (image or one-thing crop, caption) pairs from the corpus, with
    ``negatives`` shape-swapped captions per crop (``neg_texts`` / ``neg_owner``).

    ``worker`` of ``num_workers`` (data-loader workers of this process) takes every
    ``num_workers``-th image of this rank's stream and its own batch generator; one worker
    reproduces the single-process stream exactly.

    ``region_grid`` > 0 adds the segments of every whole image (not of crops) for the region loss:
    ``region_masks`` [B, S, g, g] (area-resized to the dense grid g), ``region_labels`` [B, S]
    (index into REGION_VOCABULARY, -1 = padding) and ``region_texts`` [V, 77], the vocabulary in
    one template drawn per batch.
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
        regions: List[Tuple[torch.Tensor, List[int]]] = []
        for b in range(batch_size):
            i, epoch = next(stream)
            if rng.random() < crop_prob:
                crop, caption, _, negs = corpus.thing_crop(i, epoch, negatives=negatives)
                images.append(crop)
                texts.append(caption)
                neg_texts += negs
                neg_owner += [b] * len(negs)
                if region_grid:  # a crop has no segments of its own
                    regions.append((torch.zeros(0, region_grid, region_grid), []))
            else:
                images.append(corpus.image(i))
                texts.append(corpus.caption(i, epoch))
                if region_grid:
                    regions.append(_grid_segments(corpus, i, region_grid))
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
        if region_grid:
            batch.update(_region_batch(regions, region_grid, tokenizer, [seed, step, 11, worker]))
        yield batch
        step += 1


def _grid_segments(corpus: Corpus, i: int, grid: int) -> Tuple[torch.Tensor, List[int]]:
    """Segments of corpus image ``i`` as soft masks on the dense grid + vocabulary indices."""
    masks, names = corpus.segments(i)
    unknown = [n for n in names if n not in REGION_VOCABULARY]
    if unknown:
        raise KeyError(
            f"caption corpus {corpus.root}, image {i}: classes {unknown} are not in "
            f"REGION_VOCABULARY"
        )
    soft = F.interpolate(torch.from_numpy(masks).float()[None], size=(grid, grid), mode="area")[0]
    return soft, [REGION_VOCABULARY.index(n) for n in names]


def _region_batch(regions, grid: int, tokenizer, key) -> Dict[str, torch.Tensor]:
    most = max([len(labels) for _, labels in regions] + [1])
    masks = torch.zeros(len(regions), most, grid, grid)
    labels = torch.full((len(regions), most), -1, dtype=torch.long)
    for b, (m, lab) in enumerate(regions):
        masks[b, : len(lab)] = m
        labels[b, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    rng = np.random.default_rng(key)
    template = REGION_TEMPLATES[int(rng.integers(0, len(REGION_TEMPLATES)))]
    texts = tokenizer([template.format(n) for n in REGION_VOCABULARY])
    return {"region_masks": masks, "region_labels": labels, "region_texts": texts}


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
