"""Data loaders of SPADE: detectron2's loaders with the SPADE dataset mapper."""

from __future__ import annotations

import os

from detectron2.data import build_detection_test_loader, build_detection_train_loader

from .dataset_mapper import build_dataset_mapper
from .datasets.synthetic import register_synthpsg
from .synthpsg import ensure_synthpsg

__all__ = ["build_spade_train_loader", "build_spade_test_loader", "prepare_synthpsg"]


def build_spade_train_loader(cfg):
    """Infinite training loader over cfg.DATASETS.TRAIN (batches of cfg.SOLVER.IMS_PER_BATCH
    mapped dicts, see docs/INTERFACES.md "Mapper output")."""
    return build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, is_train=True))


def build_spade_test_loader(cfg, dataset_name: str):
    """Test loader of one dataset (batch size 1, test-mode mapper)."""
    return build_detection_test_loader(
        cfg, dataset_name, mapper=build_dataset_mapper(cfg, is_train=False)
    )


def prepare_synthpsg(cfg) -> str:
    """When cfg.DATASETS.TRAIN / TEST name ``synthpsg_*`` datasets: generate SynthPSG at
    cfg.DATASETS.SYNTHPSG.ROOT unless complete there, and (re-)register ``synthpsg_*`` at that
    root. Returns the root ("" when no SynthPSG dataset is used)."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if not any(n.startswith("synthpsg_") for n in names):
        return ""
    s = cfg.DATASETS.SYNTHPSG
    root = ensure_synthpsg(s.ROOT, s.NUM_IMAGES, s.SEED, s.IMAGE_SIZE)
    register_synthpsg(os.path.abspath(root))
    return root
