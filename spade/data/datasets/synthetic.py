"""Register SynthPSG (spade/data/synthpsg.py) splits as detectron2 datasets.

Names (``prefix`` default "synthpsg"): ``<prefix>_train``, ``_val``, ``_test`` (closed set) and
``<prefix>_<split>_ovr``, ``_ovd``, ``_ovdr`` (the open-vocabulary settings of ``ov_settings.py``,
derived from the combined split ``OV_SPLIT``, also written as ``<root>/ov_split.json`` and shipped
as ``datasets/splits/synthpsg_<setting>_split.json``; only the training split is filtered), and
``<prefix>_<split>_ov``, an alias of OvD+R. The class lists are
constants, so registration needs no data; loading a split of a root that holds no complete dataset
raises FileNotFoundError with the command that generates it.
"""

from __future__ import annotations

import os
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..synthpsg import (
    OV_SPLIT,
    PREDICATE_CLASSES,
    PREDICATE_FLIP_MAP,
    STUFF_CLASSES,
    THING_CLASSES,
    is_complete,
)
from .ov_settings import ov_dataset_names, ov_setting_split
from .psg import register_psg

__all__ = ["register_synthpsg", "synthpsg_dataset_names"]

_CLASSES = {
    "thing_classes": THING_CLASSES,
    "stuff_classes": STUFF_CLASSES,
    "predicate_classes": PREDICATE_CLASSES,
}


def synthpsg_dataset_names(prefix: str = "synthpsg") -> List[str]:
    """The dataset names :func:`register_synthpsg` registers (closed set, then the OV ones)."""
    return [name for name, _, _ in _registrations(prefix)]


def _registrations(prefix: str):
    closed = [(f"{prefix}_{s}", s, None) for s in ("train", "val", "test")]
    return closed + [(n, s, ov_setting_split(OV_SPLIT, t)) for n, s, t in ov_dataset_names(prefix)]


def register_synthpsg(root: str, prefix: str = "synthpsg") -> None:
    """(Re-)register the SynthPSG splits stored under ``root`` (replacing earlier registrations)."""
    json_file = os.path.join(root, "psg.json")
    for name, split, ov_split in _registrations(prefix):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_psg(
            name,
            json_file,
            root,
            root,
            split,
            ov_split=ov_split,
            classes=_CLASSES,
            predicate_flip_map=PREDICATE_FLIP_MAP,
        )
        loader = DatasetCatalog[name]

        def load(root=root, loader=loader):
            if is_complete(root) is None:
                raise FileNotFoundError(
                    f"SynthPSG is missing under {root!r}; generate it with: python "
                    f"datasets/make_synthetic_psg.py --out {root} --num-images 600 --seed 0 "
                    "(or call spade.data.synthpsg.ensure_synthpsg / spade.data.prepare_synthpsg)"
                )
            return loader()

        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, load)
