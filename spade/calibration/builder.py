"""Builders of stage 1 from the config: model parts, teacher-map cache, dataset items, loaders.

Dataset items are ``(dataset dict, triplets)`` pairs where ``triplets`` are the first
CALIBRATION.MAX_TRIPLETS_PER_IMAGE ground-truth (subject, predicate, object) names; images
without relations are dropped from training (they give the student nothing to match).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)

from spade.modeling.backbone import (
    apply_lora,
    build_clip,
    build_diffusion_parts,
    build_implicit_text_encoder,
    check_text_conditioning,
    clip_preprocess,
    encode_text_tokens,
    load_trainable_state_dict,
    lora_disabled,
    save_trainable_state_dict,
)
from spade.provenance import STAGE1_KEY, stage1_record

from .teacher import TeacherMapCache, TeacherMapGenerator, module_fingerprint, triplet_names

__all__ = [
    "build_calibration_parts",
    "build_teacher_cache",
    "teacher_generator",
    "calibration_items",
    "CalibrationDatasetMapper",
    "build_calibration_train_loader",
    "build_calibration_test_loader",
    "TrainableWeightsIO",
    "calibration_record_of",
]


def build_calibration_parts(cfg) -> Dict:
    """Keyword arguments of :class:`~spade.calibration.model.CalibrationModel` from ``cfg``.

    Builds the frozen VAE / UNet / CLIP (MODEL.SPADE.DIFFUSION, .CLIP), injects LoRA into attn2
    (MODEL.SPADE.LORA; ENABLED False unfreezes the whole UNet instead), builds the
    implicit text encoder and the teacher generator (LoRA disabled while it runs). A UNet whose
    cross_attention_dim differs from CLIP's text width is a ValueError naming both config nodes.
    """
    c = cfg.CALIBRATION
    diffusion = build_diffusion_parts(cfg)
    clip = build_clip(cfg)
    check_text_conditioning(diffusion, clip)  # the teacher UNet reads CLIP's token states
    unet = diffusion.unet
    apply_lora(unet, cfg.MODEL.SPADE.LORA, seed=int(cfg.MODEL.SPADE.LORA.SEED))
    implicit = build_implicit_text_encoder(
        cfg, clip, unet.config.cross_attention_dim, seed=int(cfg.MODEL.SPADE.IMPLICIT_TEXT.SEED)
    )
    device = torch.device(cfg.MODEL.DEVICE)
    unet.to(device)
    diffusion.vae.to(device)
    clip.model.to(device)
    implicit.to(device)
    teacher = teacher_generator(
        cfg, diffusion, clip, unet, teacher_mode=functools.partial(lora_disabled, unet)
    )
    return {
        "unet": unet,
        "vae": diffusion.vae,
        "implicit_text": implicit,
        "clip_model": clip.model,
        "teacher": teacher,
        "clip_preprocess": functools.partial(clip_preprocess, clip_parts=clip),
        "student_timestep": int(cfg.MODEL.SPADE.DIFFUSION.TIMESTEP),
        "lambda_cal": float(c.LAMBDA),
        "student_map_source": str(c.STUDENT_MAPS),
    }


def teacher_generator(cfg, diffusion, clip, unet, **overrides) -> TeacherMapGenerator:
    """The teacher of ``unet`` with the CALIBRATION settings of ``cfg``; ``overrides`` replace
    any of them (e.g. ``inversion="ddim"``, ``noise="random"``: the stage-0 gates compare
    teachers this way) or set ``teacher_mode``."""
    c = cfg.CALIBRATION
    settings = dict(
        num_steps=int(c.NUM_INFERENCE_STEPS),
        inversion=str(c.INVERSION).lower(),
        sampler=str(c.SAMPLER).lower(),
        noise=str(c.NOISE).lower(),
        guidance_scale=float(c.GUIDANCE_SCALE),
        capture_steps=[int(s) for s in c.CAPTURE_TIMESTEPS],
        resolution=int(c.MAP_RESOLUTION),
        normalization=str(c.MAP_NORMALIZATION),
        template=str(c.PROMPT_TEMPLATE),
    )
    settings.update(overrides)
    return TeacherMapGenerator(
        unet=unet,
        vae=diffusion.vae,
        latent_scale=diffusion.latent_scale,
        scheduler=diffusion.scheduler,
        encode_text=functools.partial(encode_text_tokens, clip),
        encode_ids=clip.tokenizer.encode,
        context_length=int(tokenize_length(clip)),
        **settings,
    )


def tokenize_length(clip) -> int:
    """Context length L of the CLIP tokenizer."""
    return int(clip.tokenizer(["x"]).shape[-1])


def build_teacher_cache(cfg, model) -> TeacherMapCache:
    """The teacher-map cache of ``model`` (a CalibrationModel) under CALIBRATION.CACHE_DIR.

    The fingerprint covers the teacher's UNet (LoRA excluded), VAE and CLIP text tower weights,
    so it must be taken before any trained weights are loaded (the full fine-tuning ablation
    changes the UNet itself)."""
    cache_dir = cfg.CALIBRATION.CACHE_DIR or os.path.join(cfg.OUTPUT_DIR, "teacher_maps")
    fingerprint = module_fingerprint(model.unet, model.vae, model.clip_model)
    return TeacherMapCache(cache_dir, model.teacher, fingerprint, int(cfg.CALIBRATION.IMAGE_SIZE))


def calibration_items(
    cfg,
    dataset_name: str,
    drop_empty: bool = True,
    max_images: int = 0,
    exclude_names: Iterable[str] = (),
) -> List[Tuple[dict, list]]:
    """``(dataset dict, triplet names)`` of a registered PSG-style dataset (the first
    ``max_images`` kept ones when > 0). Triplets naming any of ``exclude_names`` (e.g. the novel
    names of an open-vocabulary setting) are left out before the first
    CALIBRATION.MAX_TRIPLETS_PER_IMAGE are taken."""
    meta = MetadataCatalog.get(dataset_name)
    for key in ("thing_classes", "stuff_classes", "predicate_classes"):
        if not hasattr(meta, key):
            raise KeyError(f"dataset {dataset_name!r}: metadata lacks {key!r}")
    classes = list(meta.thing_classes) + list(meta.stuff_classes)
    predicates = list(meta.predicate_classes)
    k = int(cfg.CALIBRATION.MAX_TRIPLETS_PER_IMAGE)
    excluded = set(exclude_names)
    items = []
    for d in DatasetCatalog.get(dataset_name):
        triplets = triplet_names(d, classes, predicates, len(d.get("relations", [])))
        triplets = [t for t in triplets if not excluded.intersection(t)]
        items.append((d, triplets[:k]))
    items = [it for it in items if it[1] or not drop_empty]
    return items[:max_images] if max_images > 0 else items


def novel_names(dataset_name: str) -> List[str]:
    """The novel object and predicate names of a dataset's open-vocabulary split ([] if none)."""
    ov = MetadataCatalog.get(dataset_name).get("ov_split", None) or {}
    return sorted(set(ov.get("novel_objects", [])) | set(ov.get("novel_predicates", [])))


class CalibrationDatasetMapper:
    """(dataset dict, triplets) -> model input, reading the teacher maps from the cache only.

    Output: ``{"image": float [3, S, S] in [0, 1], "image_id", "file_name", "triplets",
    "teacher_maps": [T, 3, R, R]}``. A missing or invalid cache file raises (precompute first).
    """

    def __init__(self, cache: TeacherMapCache):
        self.cache = cache

    def __call__(self, item: Tuple[dict, list]) -> dict:
        record, triplets = item
        image, maps, _ = self.cache.lookup(record, triplets)
        if maps is None:
            raise FileNotFoundError(
                f"no valid teacher maps for image {record['image_id']} ({record['file_name']}) in "
                f"{self.cache.cache_dir}; run the teacher precompute first"
            )
        return {
            "image": image,
            "image_id": record["image_id"],
            "file_name": record["file_name"],
            "triplets": list(triplets),
            "teacher_maps": maps,
        }


def calibration_record_of(dataset_name: str, items: Sequence[Tuple[dict, list]]) -> dict:
    """The ``spade_stage1`` record of a calibration on ``items`` of ``dataset_name``."""
    triplets = [t for _, per_image in items for t in per_image]
    return stage1_record(dataset_name, MetadataCatalog.get(dataset_name), triplets)


def build_calibration_train_loader(cfg, items: Sequence, cache: TeacherMapCache):
    """Infinite, rank-sharded, shuffled loader of batches (lists) of mapped items."""
    return build_detection_train_loader(
        list(items),
        mapper=CalibrationDatasetMapper(cache),
        total_batch_size=int(cfg.SOLVER.IMS_PER_BATCH),
        aspect_ratio_grouping=False,
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
    )


def build_calibration_test_loader(cfg, items: Sequence, cache: TeacherMapCache):
    """Finite loader (batch 1 per rank, each rank a shard) of mapped items."""
    return build_detection_test_loader(
        list(items),
        mapper=CalibrationDatasetMapper(cache),
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
    )


class TrainableWeightsIO:
    """Stage 1's weights format for :class:`spade.engine.SafetensorsCheckpointer`.

    ``save(path, metadata)`` writes the LoRA (or whole UNet) + MLP adapter weights with
    :func:`~spade.modeling.backbone.save_trainable_state_dict` (exactly what stage 2's
    MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS loads), with the ``spade_stage1`` record
    (spade.provenance: dataset, split, ov_split, names in the teacher prompts) when given;
    ``load(path)`` reads them back, checking the shapes in the metadata.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        implicit_text: torch.nn.Module,
        record: Optional[dict] = None,
    ):
        self.unet, self.implicit_text = unet, implicit_text
        self.record = record

    def save(self, path: str, metadata: Dict[str, str]) -> None:
        metadata = dict(metadata)
        if self.record is not None:
            metadata[STAGE1_KEY] = json.dumps(self.record, sort_keys=True)
        save_trainable_state_dict(path, self.unet, self.implicit_text, extra_metadata=metadata)

    def load(self, path: str) -> None:
        try:
            load_trainable_state_dict(path, self.unet, self.implicit_text)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as e:  # safetensors' own error types on a corrupt header
            raise ValueError(f"checkpoint {path} is not a valid safetensors file: {e}") from None
