"""SPADEDatasetMapper: a PSG-style dataset dict -> model input with masks and relations.

Shape shorthand: N instances, R relations, H' x W' the augmented image size.

Training: large-scale jitter (``T.ResizeScale`` to INPUT.IMAGE_SIZE times a factor in
[INPUT.MIN_SCALE, INPUT.MAX_SCALE]), a fixed-size INPUT.IMAGE_SIZE crop (no padding: the model pads
batches), then a random horizontal flip (INPUT.RANDOM_FLIP). Segments left with fewer than
INPUT.CROP.MIN_KEEP_AREA pixels are dropped together with their relations; the other relation
indices are remapped. A flip swaps predicates through the metadata's ``predicate_flip_map``.
Test: one resize so the image fits INPUT.IMAGE_SIZE (aspect kept), nothing dropped.
INPUT.AUGMENTATION_SLOTS K > 0 (training): each use of an image draws one of K slots, and the
slot seeds the augmentation (from the image id, the slot and SEED), so an image is seen in at most
K versions, each with the same pixels every time (what DIFFUSION.FEATURE_CACHE reuses).

Panoptic datasets: the PNG (COCO RGB ids) is turned into a map of segment indices (0 = void or a
segment the open-vocabulary filter removed, ``void_segment_ids``), which is augmented once, so
masks stay a partition. The PNG and ``segments_info`` are checked both ways (as panopticapi
does): an id of one that is absent from the other is an error naming the PNG, the image id and
the ids. Images of any PIL mode are read by :func:`spade.data.image_io.read_image`.
Box-only datasets (VG, ``pan_seg_file_name`` None): boxes are transformed and rasterised as
box-shaped masks (they may overlap).

Unreadable image: training follows INPUT.CORRUPT_IMAGE_POLICY ("skip": return None so detectron2's
loader takes another image, counted and logged; "fatal": raise). Test mode always raises, so an
evaluation never silently scores a different image set.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances
from panopticapi.utils import rgb2id
from PIL import Image

from .image_io import read_image

__all__ = [
    "SPADEDatasetMapper",
    "DATASET_MAPPERS",
    "register_dataset_mapper",
    "build_dataset_mapper",
    "flip_permutation",
]

logger = logging.getLogger(__name__)

# Dataset mappers keyed by INPUT.DATASET_MAPPER_NAME. Each is called as ``cls(cfg, is_train=bool)``
# (a @configurable class); the object maps one dataset dict to a model input dict or None (skip).
DATASET_MAPPERS: Dict[str, type] = {}


def register_dataset_mapper(name: str):
    """Class decorator adding a mapper to DATASET_MAPPERS under ``name``."""

    def deco(cls):
        if name in DATASET_MAPPERS:
            raise KeyError(f"dataset mapper {name!r} is already registered")
        DATASET_MAPPERS[name] = cls
        return cls

    return deco


def flip_permutation(predicate_classes: Sequence[str], flip_map) -> List[int]:
    """Predicate index permutation of a horizontal flip: ``perm[p]`` = the flipped predicate."""
    index = {n: i for i, n in enumerate(predicate_classes)}
    perm = list(range(len(predicate_classes)))
    for a, b in flip_map:
        if a not in index or b not in index:
            raise ValueError(f"predicate_flip_map pair ({a!r}, {b!r}) names an unknown predicate")
        perm[index[a]], perm[index[b]] = index[b], index[a]
    return perm


@register_dataset_mapper("spade_psg")
class SPADEDatasetMapper:
    """Maps a dict of docs/INTERFACES.md to {"image", "height", "width", "image_id", "file_name",
    "instances" (gt_classes [N], gt_masks [N, H', W'] bool, gt_boxes), "gt_relations" [R, 3]}."""

    skipped_images = 0  # images skipped under the "skip" policy in this process

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        augmentations: List[T.Augmentation],
        image_format: str,
        flip_perm: Optional[List[int]] = None,
        min_keep_area: int = 0,
        corrupt_image_policy: str = "skip",
        augmentation_slots: int = 0,
        slot_seed: int = 0,
    ):
        """
        Args:
            is_train: training (drops cut-away segments; honours corrupt_image_policy) or test.
            augmentations: detectron2 augmentations applied to image and segment-index map.
            image_format: detectron2 image format of the output ("RGB" or "BGR").
            flip_perm: predicate permutation applied per horizontal flip (None = identity).
            min_keep_area: training drops segments with fewer visible pixels after augmentation.
            corrupt_image_policy: "skip" or "fatal" (training only; test always raises).
            augmentation_slots: > 0: training augments each image in one of this many seeded
                ways (module docstring); 0: freshly at random.
            slot_seed: mixed into the seed of every slot.
        """
        if corrupt_image_policy not in ("skip", "fatal"):
            raise ValueError(
                f"INPUT.CORRUPT_IMAGE_POLICY must be 'skip' or 'fatal', got "
                f"{corrupt_image_policy!r}"
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.flip_perm = torch.as_tensor(flip_perm, dtype=torch.long) if flip_perm else None
        self.min_keep_area = int(min_keep_area)
        self.corrupt_image_policy = corrupt_image_policy
        if augmentation_slots < 0:
            raise ValueError(f"INPUT.AUGMENTATION_SLOTS={augmentation_slots}: must be >= 0")
        self.augmentation_slots = int(augmentation_slots) if is_train else 0
        self.slot_seed = int(slot_seed)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        size = cfg.INPUT.IMAGE_SIZE
        if is_train:
            augs = [
                T.ResizeScale(cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE, size, size),
                T.FixedSizeCrop((size, size), pad=False),
            ]
            if cfg.INPUT.RANDOM_FLIP == "horizontal":
                augs.append(T.RandomFlip(horizontal=True, vertical=False))
            elif cfg.INPUT.RANDOM_FLIP != "none":
                raise ValueError(
                    f"INPUT.RANDOM_FLIP must be 'none' or 'horizontal', got "
                    f"{cfg.INPUT.RANDOM_FLIP!r}"
                )
        else:
            augs = [T.ResizeShortestEdge(size, max_size=size)]
        names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
        flip_perm = None
        if names and is_train:
            meta = MetadataCatalog.get(names[0])
            if not hasattr(meta, "predicate_classes"):
                raise KeyError(
                    f"dataset {names[0]!r} is not registered as a PSG-style dataset (its metadata "
                    "has no predicate_classes); see datasets/README.md"
                )
            flip_perm = flip_permutation(
                meta.predicate_classes, getattr(meta, "predicate_flip_map", [])
            )
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "flip_perm": flip_perm,
            "min_keep_area": cfg.INPUT.CROP.MIN_KEEP_AREA,
            "corrupt_image_policy": cfg.INPUT.CORRUPT_IMAGE_POLICY,
            "augmentation_slots": cfg.INPUT.AUGMENTATION_SLOTS,
            "slot_seed": max(cfg.SEED, 0),
        }

    @contextlib.contextmanager
    def _slot_random_state(self, d: dict):
        """With augmentation slots, run the augmentations (which draw from numpy's global random
        state, as detectron2's do) under a state seeded by (SEED, image id, drawn slot); the
        global state is restored afterwards. Without slots: no change."""
        if not self.augmentation_slots:
            yield
            return
        slot = int(np.random.randint(self.augmentation_slots))
        key = f"{self.slot_seed}/{d.get('image_id', d.get('file_name'))}/{slot}"
        saved = np.random.get_state()
        np.random.seed(zlib.crc32(key.encode()))
        try:
            yield
        finally:
            np.random.set_state(saved)

    # ------------------------------------------------------------------ reading
    def _read_image(self, d: dict) -> Optional[np.ndarray]:
        try:
            image = read_image(d["file_name"], format=self.image_format)
        except Exception as e:  # unreadable or missing file: PIL / OS errors of many kinds
            msg = f"cannot read image {d['file_name']} (image_id {d.get('image_id')}): {e}"
            if self.is_train and self.corrupt_image_policy == "skip":
                SPADEDatasetMapper.skipped_images += 1
                logger.warning(
                    "%s; skipped (%d skipped so far)", msg, SPADEDatasetMapper.skipped_images
                )
                return None
            raise OSError(msg) from e
        utils.check_image_size(d, image)
        return image

    @staticmethod
    def _segment_index_map(d: dict, shape: Tuple[int, int]) -> np.ndarray:
        """[H, W] int64 map: k + 1 where segment k of segments_info is, 0 elsewhere."""
        path = d["pan_seg_file_name"]
        try:
            with Image.open(path) as im:
                ids = rgb2id(np.asarray(im.convert("RGB")))
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read panoptic PNG {path} (image_id {d['image_id']}): {e}") from e
        if ids.shape != tuple(shape):
            raise ValueError(
                f"panoptic PNG {path} (image_id {d['image_id']}) is {ids.shape[::-1]} "
                f"(W, H) but the image is {tuple(shape)[::-1]}"
            )
        seg_ids = np.array([s["id"] for s in d["segments_info"]], dtype=np.int64)
        uniq, inv = np.unique(ids, return_inverse=True)
        present = np.isin(seg_ids, uniq)
        if not present.all():
            raise ValueError(
                f"panoptic PNG {path} (image_id {d['image_id']}): segments_info ids "
                f"{seg_ids[~present].tolist()} do not occur in the PNG"
            )
        known = set(seg_ids.tolist()) | set(d.get("void_segment_ids", [])) | {0}
        unknown = [int(u) for u in uniq if int(u) not in known]
        if unknown:
            raise ValueError(
                f"panoptic PNG {path} (image_id {d['image_id']}): ids {unknown[:10]} in the PNG "
                "are not in segments_info"
            )
        lookup = {int(s): k + 1 for k, s in enumerate(seg_ids)}
        index_of_id = np.array([lookup.get(int(u), 0) for u in uniq], dtype=np.int64)
        return index_of_id[inv].reshape(ids.shape)

    # ------------------------------------------------------------------ mapping
    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        d = copy.deepcopy(dataset_dict)
        image = self._read_image(d)
        if image is None:
            return None
        segs = d["segments_info"]
        box_only = d.get("pan_seg_file_name") is None
        if box_only:
            boxes = np.array([s["bbox"] for s in segs], dtype=np.float64).reshape(-1, 4)
            aug_input = T.AugInput(image, boxes=boxes)
        else:
            index_map = self._segment_index_map(d, image.shape[:2])
            dtype = np.uint8 if len(segs) < 255 else np.float32
            aug_input = T.AugInput(image, sem_seg=index_map.astype(dtype))
        with self._slot_random_state(d):
            transforms = self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        n = len(segs)
        if box_only:
            masks = self._box_masks(aug_input.boxes, h, w)
        else:
            index_map = aug_input.sem_seg.astype(np.int64)
            masks = torch.from_numpy(index_map[None] == np.arange(1, n + 1)[:, None, None])
        classes = torch.tensor([s["category_id"] for s in segs], dtype=torch.long)
        rels = torch.tensor(d.get("relations", []), dtype=torch.long).reshape(-1, 3)

        if self.is_train:
            keep = masks.flatten(1).sum(1) >= max(self.min_keep_area, 1)
            remap = torch.full((n,), -1, dtype=torch.long)
            remap[keep] = torch.arange(int(keep.sum()))
            masks, classes = masks[keep], classes[keep]
            if len(rels):
                rels = torch.stack([remap[rels[:, 0]], remap[rels[:, 1]], rels[:, 2]], 1)
                rels = rels[(rels[:, 0] >= 0) & (rels[:, 1] >= 0)]
        flips = sum(isinstance(t, T.HFlipTransform) for t in transforms.transforms)
        if flips % 2 == 1 and self.flip_perm is not None and len(rels):
            rels[:, 2] = self.flip_perm[rels[:, 2]]

        instances = Instances((h, w))
        instances.gt_classes = classes
        instances.gt_masks = masks
        instances.gt_boxes = self._mask_boxes(masks)
        return {
            "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "height": d["height"],
            "width": d["width"],
            "image_id": d["image_id"],
            "file_name": d["file_name"],
            "instances": instances,
            "gt_relations": rels,
        }

    @staticmethod
    def _box_masks(boxes: np.ndarray, h: int, w: int) -> torch.Tensor:
        """Box-shaped masks [N, h, w] bool; a pixel is in when its centre is inside the box."""
        b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        ys = torch.arange(h, dtype=torch.float32)[None, :, None] + 0.5
        xs = torch.arange(w, dtype=torch.float32)[None, None, :] + 0.5
        return (
            (xs >= b[:, 0, None, None])
            & (xs < b[:, 2, None, None])
            & (ys >= b[:, 1, None, None])
            & (ys < b[:, 3, None, None])
        )

    @staticmethod
    def _mask_boxes(masks: torch.Tensor) -> Boxes:
        """Tight xyxy boxes [N, 4] of masks [N, H, W] (x1 / y1 exclusive; empty mask -> zeros)."""
        boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32)
        for k, m in enumerate(masks):
            ys = torch.nonzero(m.any(1)).flatten()
            xs = torch.nonzero(m.any(0)).flatten()
            if len(xs):
                boxes[k] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
        return Boxes(boxes)


def build_dataset_mapper(cfg, is_train: bool):
    """The mapper named by cfg.INPUT.DATASET_MAPPER_NAME (a key of DATASET_MAPPERS)."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in DATASET_MAPPERS:
        raise KeyError(
            f"INPUT.DATASET_MAPPER_NAME {name!r} is not one of {sorted(DATASET_MAPPERS)}"
        )
    return DATASET_MAPPERS[name](cfg, is_train=is_train)
