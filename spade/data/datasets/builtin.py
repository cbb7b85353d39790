"""Built-in dataset registrations (imported by ``spade.data.datasets``).

* PSG: ``psg_train`` / ``psg_val`` / ``psg_test`` and the open-vocabulary settings
  ``psg_{train,val,test}_{ovr,ovd,ovdr}`` (``_ov`` = ``_ovdr``; see ``ov_settings.py``) from
  SPADE's fixed split files ``datasets/splits/psg_<setting>_split.json``, or derived from the
  combined json ``SPADE_PSG_OV_SPLIT`` names ("" turns the OV variants off), when the annotation
  file exists,
  silently skipped otherwise. Paths (environment variables, defaults in brackets):
  ``SPADE_PSG_JSON`` [$DETECTRON2_DATASETS/psg/psg.json], ``SPADE_PSG_IMAGE_ROOT``
  [$DETECTRON2_DATASETS/coco], ``SPADE_PSG_SEG_ROOT`` [$DETECTRON2_DATASETS/coco];
  ``DETECTRON2_DATASETS`` defaults to "datasets". The PSG class lists are the COCO panoptic names
  and the 56 PSG predicates; loading checks that psg.json agrees.
* VG150: ``vg150_{train,val,test}`` and ``vg150_{train,val,test}_{ovr,ovd,ovdr,ov}`` (the OvSGTR
  split, ``datasets/splits/vg150_<setting>_split.json``) when
  ``SPADE_VG_ROOT`` [$DETECTRON2_DATASETS/vg] holds ``VG-SGG-with-attri.h5``,
  ``VG-SGG-dicts-with-attri.json`` and ``image_data.json`` (images under ``VG_100K/``).
* SynthPSG: ``synthpsg_{train,val,test}[_ovr|_ovd|_ovdr|_ov]`` at ``SPADE_SYNTHPSG_ROOT``
  [datasets/synthpsg], registered whether or not the data exists yet (see ``synthetic.py``).
"""

from __future__ import annotations

import os

from detectron2.data import DatasetCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .ov_settings import ov_dataset_names, ov_setting_file, ov_setting_split
from .psg import load_ov_split, register_psg
from .synthetic import register_synthpsg
from .vg import register_vg150

__all__ = [
    "PSG_PREDICATE_CLASSES",
    "PSG_CLASSES",
    "PSG_OV_SPLIT_FILE",
    "register_all_psg",
    "register_all_vg150",
    "register_all_synthpsg",
]

PSG_PREDICATE_CLASSES = [
    "over", "in front of", "beside", "on", "in", "attached to", "hanging from", "on back of",
    "falling off", "going down", "painted on", "walking on", "running on", "crossing",
    "standing on", "lying on", "sitting on", "flying over", "jumping over", "jumping from",
    "wearing", "holding", "carrying", "looking at", "guiding", "kissing", "eating", "drinking",
    "feeding", "biting", "catching", "picking", "playing with", "chasing", "climbing", "cleaning",
    "playing", "touching", "pushing", "pulling", "opening", "cooking", "talking to", "throwing",
    "slicing", "driving", "riding", "parked on", "driving on", "about to hit", "kicking",
    "swinging", "entering", "exiting", "enclosing", "leaning on",
]  # fmt: skip
# SPADE's fixed base/novel split of PSG (rule inside; datasets/make_psg_ov_split.py writes it)
PSG_OV_SPLIT_FILE = os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "datasets", "splits", "psg_ov_split.json"
)
_VG_FILES = ("VG-SGG-with-attri.h5", "VG-SGG-dicts-with-attri.json", "image_data.json")
PSG_CLASSES = {
    "thing_classes": [c["name"] for c in COCO_CATEGORIES if c["isthing"]],
    "stuff_classes": [c["name"] for c in COCO_CATEGORIES if not c["isthing"]],
    "predicate_classes": PSG_PREDICATE_CLASSES,
}


def register_all_psg(datasets_root: str = "") -> None:
    """Register psg_train / psg_val / psg_test when the PSG annotation file exists."""
    root = datasets_root or os.environ.get("DETECTRON2_DATASETS", "datasets")
    json_file = os.environ.get("SPADE_PSG_JSON", os.path.join(root, "psg", "psg.json"))
    image_root = os.environ.get("SPADE_PSG_IMAGE_ROOT", os.path.join(root, "coco"))
    seg_root = os.environ.get("SPADE_PSG_SEG_ROOT", os.path.join(root, "coco"))
    if not os.path.isfile(json_file):
        return
    ov_file = os.environ.get("SPADE_PSG_OV_SPLIT", PSG_OV_SPLIT_FILE)
    splits = [(f"psg_{s}", s, None) for s in ("train", "val", "test")]
    if ov_file:
        splits += [(n, s, _psg_setting_split(ov_file, t)) for n, s, t in ov_dataset_names("psg")]
    for name, split, ov in splits:
        if name not in DatasetCatalog.list():
            register_psg(
                name, json_file, image_root, seg_root, split, ov_split=ov, classes=PSG_CLASSES
            )


def _psg_setting_split(ov_file: str, setting: str):
    """The shipped split file of ``setting``, or the one derived from another combined file."""
    if os.path.normpath(ov_file) == os.path.normpath(PSG_OV_SPLIT_FILE):
        return ov_setting_file("psg", setting)
    return ov_setting_split(load_ov_split(ov_file), setting)


def register_all_vg150(datasets_root: str = "") -> None:
    """Register vg150_* when the three VG150 files exist under $SPADE_VG_ROOT."""
    root = datasets_root or os.environ.get("DETECTRON2_DATASETS", "datasets")
    vg = os.environ.get("SPADE_VG_ROOT", os.path.join(root, "vg"))
    files = [os.path.join(vg, n) for n in _VG_FILES]
    if not all(os.path.isfile(f) for f in files):
        return
    names = [(f"vg150_{s}", s, None) for s in ("train", "val", "test")]
    names += [(n, s, ov_setting_file("vg150", t)) for n, s, t in ov_dataset_names("vg150")]
    for name, split, ov in names:
        if name not in DatasetCatalog.list():
            register_vg150(name, *files, os.path.join(vg, "VG_100K"), split, ov_split=ov)


def register_all_synthpsg() -> None:
    """Register the SynthPSG splits at $SPADE_SYNTHPSG_ROOT (default datasets/synthpsg)."""
    register_synthpsg(os.environ.get("SPADE_SYNTHPSG_ROOT", os.path.join("datasets", "synthpsg")))


register_all_psg()
register_all_vg150()
register_all_synthpsg()
