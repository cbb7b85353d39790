"""The three open-vocabulary settings of the SPADE paper and their split files.

* ``ovr``  (OvR): some predicates are novel; object classes are closed-set.
* ``ovd``  (OvD): some object classes are novel; predicates are closed-set.
* ``ovdr`` (OvD+R): both.

Each dataset keeps one *combined* split (``datasets/splits/psg_ov_split.json``, the OvSGTR
``vg150_ov_splits.json``, SynthPSG's ``OV_SPLIT``); the split of a setting is derived from it by
:func:`ov_setting_split` (OvR moves every novel object into the base objects, OvD every novel
predicate into the base predicates) and shipped as
``datasets/splits/<dataset>_<setting>_split.json``, written by :func:`write_ov_setting_files`
(a test checks the files equal the derivation).

Registered names: ``<prefix>_<split>_<setting>`` (e.g. ``psg_train_ovr``), and the older
``<prefix>_<split>_ov`` as an alias of OvD+R. Only the training split is filtered.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

__all__ = [
    "OV_SETTINGS",
    "OV_ALIAS",
    "SPLITS_DIR",
    "ov_setting_split",
    "ov_setting_file",
    "ov_dataset_names",
    "write_ov_setting_files",
]

OV_SETTINGS = {
    "ovr": "OvR: novel predicates only (object classes closed-set)",
    "ovd": "OvD: novel object classes only (predicates closed-set)",
    "ovdr": "OvD+R: novel object classes and novel predicates",
}
OV_ALIAS = {"ov": "ovdr"}  # the older combined names run OvD+R
SPLITS_DIR = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "..", "datasets", "splits")
)


def ov_setting_split(split: Dict[str, List[str]], setting: str) -> Dict[str, List[str]]:
    """The split of ``setting`` ("ovr", "ovd", "ovdr") derived from a combined split (dict with
    base_/novel_ objects and predicates). Order of names is kept; base lists come first."""
    if setting not in OV_SETTINGS:
        raise ValueError(
            f"unknown open-vocabulary setting {setting!r}; expected {list(OV_SETTINGS)}"
        )
    out = {k: list(split[k]) for k in _KEYS}
    if setting == "ovr":
        out["base_objects"] += out["novel_objects"]
        out["novel_objects"] = []
    elif setting == "ovd":
        out["base_predicates"] += out["novel_predicates"]
        out["novel_predicates"] = []
    return out


_KEYS = ("base_objects", "novel_objects", "base_predicates", "novel_predicates")


def ov_setting_file(dataset: str, setting: str) -> str:
    """Path of the shipped split file of ``dataset`` ("psg", "vg150", "synthpsg")."""
    return os.path.join(SPLITS_DIR, f"{dataset}_{setting}_split.json")


def ov_dataset_names(prefix: str, splits=("train", "val", "test")) -> List[Tuple[str, str, str]]:
    """``(name, split, setting)`` of every open-vocabulary registration of ``prefix``, aliases
    included (their setting is the one they stand for)."""
    out = []
    for suffix in list(OV_SETTINGS) + list(OV_ALIAS):
        setting = OV_ALIAS.get(suffix, suffix)
        out += [(f"{prefix}_{s}_{suffix}", s, setting) for s in splits]
    return out


def write_ov_setting_files(
    split: Dict[str, List[str]], dataset: str, source: str, out_dir: str = SPLITS_DIR
) -> List[str]:
    """Write ``<out_dir>/<dataset>_<setting>_split.json`` for the three settings; returns paths.

    Each file holds the derived lists plus ``setting`` (its description) and ``source`` (the
    combined split it was derived from)."""
    paths = []
    os.makedirs(out_dir, exist_ok=True)
    for setting, description in OV_SETTINGS.items():
        data = {"setting": description, "source": source, **ov_setting_split(split, setting)}
        path = os.path.join(out_dir, f"{dataset}_{setting}_split.json")
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        paths.append(path)
    return paths
