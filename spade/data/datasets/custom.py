"""Your own PSG-format dataset from the config alone (``DATASETS.CUSTOM``).

The entry points call :func:`register_custom_dataset` after reading the config (in every process),
so ``train_net.py`` / ``calibrate_net.py`` / ``demo.py`` train and evaluate on a dataset with its
own class and predicate lists without any Python:

    DATASETS.CUSTOM.NAME my_psg  DATASETS.CUSTOM.JSON_FILE path/psg.json
    DATASETS.CUSTOM.IMAGE_ROOT path/images  DATASETS.CUSTOM.PANOPTIC_ROOT path/panoptic
    DATASETS.TRAIN ("my_psg_train",)  DATASETS.TEST ("my_psg_val",)

registers ``my_psg_train``, ``my_psg_val``, ``my_psg_test`` (split rules of :mod:`.psg`), and with
``DATASETS.CUSTOM.OV_SPLIT`` also ``my_psg_{train,val,test}_ov``. Earlier registrations of these
names are replaced; built-in prefixes are refused.
"""

from __future__ import annotations

import os
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog

from .psg import register_psg

__all__ = ["register_custom_dataset", "custom_dataset_names"]

_BUILTIN_PREFIXES = ("psg", "vg150", "synthpsg")
_SPLITS = ("train", "val", "test")


def custom_dataset_names(name: str, with_ov: bool) -> List[str]:
    """The names :func:`register_custom_dataset` registers for prefix ``name``."""
    suffixes = ("", "_ov") if with_ov else ("",)
    return [f"{name}_{split}{sfx}" for sfx in suffixes for split in _SPLITS]


def register_custom_dataset(cfg) -> List[str]:
    """Register the dataset of ``cfg.DATASETS.CUSTOM`` (nothing when NAME is ""); returns the names.

    Raises ValueError naming the key when NAME is set but a path is empty or NAME is a built-in
    prefix; a missing or malformed psg.json is the error of :func:`register_psg` (file and field).
    """
    c = cfg.DATASETS.CUSTOM
    name = str(c.NAME).strip()
    if not name:
        return []
    if name in _BUILTIN_PREFIXES:
        raise ValueError(
            f"DATASETS.CUSTOM.NAME {name!r} is the prefix of built-in datasets; choose another"
        )
    for key in ("JSON_FILE", "IMAGE_ROOT", "PANOPTIC_ROOT"):
        if not str(c[key]).strip():
            raise ValueError(f"DATASETS.CUSTOM.NAME is {name!r} but DATASETS.CUSTOM.{key} is empty")
    json_file, image_root, seg_root = (
        os.path.abspath(c[key]) for key in ("JSON_FILE", "IMAGE_ROOT", "PANOPTIC_ROOT")
    )
    ov_split = os.path.abspath(c.OV_SPLIT) if str(c.OV_SPLIT).strip() else None
    names = custom_dataset_names(name, with_ov=ov_split is not None)
    for dataset in names:
        if dataset in DatasetCatalog.list():
            DatasetCatalog.remove(dataset)
            MetadataCatalog.remove(dataset)
        register_psg(
            dataset,
            json_file,
            image_root,
            seg_root,
            dataset[len(name) + 1 :].replace("_ov", ""),
            ov_split=ov_split if dataset.endswith("_ov") else None,
        )
    return names
