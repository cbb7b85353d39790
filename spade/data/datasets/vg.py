"""Register Visual Genome VG150 splits (the standard VG-SGG h5/json files) with detectron2.

Files: ``VG-SGG-with-attri.h5`` (``split`` 0 train / 2 test, ``labels`` [B, 1] 1-based,
``boxes_1024`` or ``boxes_512`` [B, 4] (cx, cy, w, h) at that longest-side scale,
``img_to_first_box`` / ``img_to_last_box`` / ``img_to_first_rel`` / ``img_to_last_rel``
(inclusive, -1 = none), ``relationships`` [R, 2] global box indices, ``predicates`` [R, 1]
1-based), ``VG-SGG-dicts-with-attri.json`` (``idx_to_label``, ``idx_to_predicate`` with 1-based
string keys) and ``image_data.json`` (per h5 image, in order, after dropping the four known corrupt
images: ``image_id``, ``width``, ``height``).

Splits: ``train`` = split 0 minus its first ``num_val`` images, ``val`` = those first ``num_val``
images, ``test`` = split 2; images without boxes are left out, ``train`` also leaves out images
without relations (logged) and applies the open-vocabulary filter (novel objects' boxes and every
relation touching them or using a novel predicate are removed). Exact duplicate triplets are
removed everywhere. VG has boxes, not masks: dicts carry no panoptic PNG (``pan_seg_file_name`` is
None), the mapper rasterises box-shaped masks, and metadata has ``box_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from .psg import apply_ov_filter, dedupe_relations, load_ov_split, psg_metadata

__all__ = ["register_vg150", "load_vg150", "VG150_OV_SPLIT_FILE"]

logger = logging.getLogger(__name__)

VG150_OV_SPLIT_FILE = os.path.normpath(
    os.path.join(
        os.path.dirname(__file__), "..", "..", "..", "datasets", "splits", "vg150_ov_splits.json"
    )
)
CORRUPT_IMAGES = ("1592.jpg", "1722.jpg", "4616.jpg", "4617.jpg")
_H5_KEYS = (
    "split",
    "labels",
    "img_to_first_box",
    "img_to_last_box",
    "img_to_first_rel",
    "img_to_last_rel",
    "relationships",
    "predicates",
)


def _index_names(mapping: Dict[str, str], path: str, field: str) -> List[str]:
    try:
        keys = sorted(int(k) for k in mapping)
    except ValueError as e:
        raise ValueError(f"{path}: field {field!r} has a non-integer key ({e})") from None
    if keys != list(range(1, len(keys) + 1)):
        raise ValueError(f"{path}: field {field!r} keys are not 1..{len(keys)}")
    return [mapping[str(k)] for k in keys]


def read_vg150_classes(dicts_file: str) -> Dict[str, List[str]]:
    """Class and predicate names (0-based order) from VG-SGG-dicts-with-attri.json."""
    with open(dicts_file) as f:
        d = json.load(f)
    for key in ("idx_to_label", "idx_to_predicate"):
        if key not in d:
            raise ValueError(f"{dicts_file}: missing field {key!r}")
    return {
        "thing_classes": _index_names(d["idx_to_label"], dicts_file, "idx_to_label"),
        "stuff_classes": [],
        "predicate_classes": _index_names(d["idx_to_predicate"], dicts_file, "idx_to_predicate"),
    }


def load_vg150(
    h5_file: str,
    dicts_file: str,
    image_data_file: str,
    image_root: str,
    split: str,
    ov_split: Optional[Dict[str, List[str]]] = None,
    num_val: int = 5000,
    dataset_name: str = "",
) -> List[dict]:
    """Load one VG150 split as dataset dicts (boxes only; see the module docstring)."""
    import h5py

    if split not in ("train", "val", "test"):
        raise ValueError(f"{h5_file}: unknown split {split!r}; expected train, val or test")
    for path in (h5_file, dicts_file, image_data_file):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VG150 file {path} does not exist")
    classes = read_vg150_classes(dicts_file)
    n_cls, n_pred = len(classes["thing_classes"]), len(classes["predicate_classes"])
    with h5py.File(h5_file, "r") as h5:
        for key in _H5_KEYS:
            if key not in h5:
                raise ValueError(f"{h5_file}: missing dataset {key!r}")
        scale = 1024 if "boxes_1024" in h5 else 512
        if f"boxes_{scale}" not in h5:
            raise ValueError(f"{h5_file}: missing dataset 'boxes_1024' (or 'boxes_512')")
        h = {k: h5[k][:] for k in _H5_KEYS}
        boxes = h5[f"boxes_{scale}"][:].astype(np.float64)
    labels = h["labels"].reshape(-1)
    preds = h["predicates"].reshape(-1)
    with open(image_data_file) as f:
        images = [im for im in json.load(f) if f"{im['image_id']}.jpg" not in CORRUPT_IMAGES]
    if len(images) != len(h["split"]):
        raise ValueError(
            f"{image_data_file}: {len(images)} images (after dropping corrupt ones) "
            f"but {h5_file} has {len(h['split'])}"
        )
    flag = 2 if split == "test" else 0
    index = np.nonzero((h["split"] == flag) & (h["img_to_first_box"] >= 0))[0]
    if split != "test":
        index = index[:num_val] if split == "val" else index[num_val:]

    dicts = []
    for i in index:
        im = images[i]
        image_id = str(im["image_id"])
        width, height = int(im["width"]), int(im["height"])
        b0, b1 = int(h["img_to_first_box"][i]), int(h["img_to_last_box"][i])
        segs = []
        for k, j in enumerate(range(b0, b1 + 1)):
            lab = int(labels[j])
            if not 1 <= lab <= n_cls:
                raise ValueError(
                    f"{h5_file}: image_id {image_id}: labels[{j}] = {lab} is not a "
                    f"known category (1..{n_cls})"
                )
            cx, cy, w, hh = boxes[j] * max(width, height) / scale
            x0, y0 = np.clip([cx - w / 2, cy - hh / 2], 0, [width - 1, height - 1])
            x1, y1 = np.clip([cx + w / 2, cy + hh / 2], [x0 + 1, y0 + 1], [width, height])
            segs.append(
                {
                    "id": k + 1,
                    "category_id": lab - 1,
                    "iscrowd": 0,
                    "isthing": True,
                    "area": int(round((x1 - x0) * (y1 - y0))),
                    "bbox": [float(x0), float(y0), float(x1), float(y1)],
                }
            )
        rels = []
        r0, r1 = int(h["img_to_first_rel"][i]), int(h["img_to_last_rel"][i])
        if r0 >= 0:
            for r in range(r0, r1 + 1):
                s, o = (int(v) - b0 for v in h["relationships"][r])
                p = int(preds[r])
                if not (0 <= s < len(segs) and 0 <= o < len(segs)):
                    raise ValueError(
                        f"{h5_file}: image_id {image_id}: relationships[{r}] points "
                        f"outside the image's boxes {b0}..{b1}"
                    )
                if not 1 <= p <= n_pred:
                    raise ValueError(
                        f"{h5_file}: image_id {image_id}: predicates[{r}] = {p} is "
                        f"out of range (1..{n_pred})"
                    )
                rels.append([s, o, p - 1])
        dicts.append(
            {
                "file_name": os.path.join(image_root, f"{image_id}.jpg"),
                "height": height,
                "width": width,
                "image_id": image_id,
                "pan_seg_file_name": None,
                "segments_info": segs,
                "relations": dedupe_relations(rels),
            }
        )
    if ov_split is not None and split == "train":
        cidx = {n: i for i, n in enumerate(classes["thing_classes"])}
        pidx = {n: i for i, n in enumerate(classes["predicate_classes"])}
        unknown = [n for n in ov_split["novel_objects"] if n not in cidx] + [
            n for n in ov_split["novel_predicates"] if n not in pidx
        ]
        if unknown:
            raise ValueError(f"{dicts_file}: open-vocabulary split names unknown classes {unknown}")
        novel_c = {cidx[n] for n in ov_split["novel_objects"]}
        novel_p = {pidx[n] for n in ov_split["novel_predicates"]}
        dicts = [apply_ov_filter(d, novel_c, novel_p) for d in dicts]
    if split == "train":
        kept = [d for d in dicts if d["relations"]]
        if len(kept) < len(dicts):
            logger.info(
                "%s (%s, split train): dropped %d of %d images without relations",
                dataset_name or h5_file,
                h5_file,
                len(dicts) - len(kept),
                len(dicts),
            )
        dicts = kept
    return dicts


def register_vg150(
    name: str,
    h5_file: str,
    dicts_file: str,
    image_data_file: str,
    image_root: str,
    split: str,
    ov_split: Optional[Dict[str, List[str]] | str] = None,
    num_val: int = 5000,
) -> None:
    """Register VG150 split ``split`` as dataset ``name``; ``ov_split`` = dict or json path
    (e.g. :data:`VG150_OV_SPLIT_FILE`, the OvSGTR split)."""
    if isinstance(ov_split, str):
        ov_split = load_ov_split(ov_split)
    classes = read_vg150_classes(dicts_file)
    meta = psg_metadata(classes["thing_classes"], [], classes["predicate_classes"], ov_split, [])
    DatasetCatalog.register(
        name,
        lambda: load_vg150(
            h5_file, dicts_file, image_data_file, image_root, split, ov_split, num_val, name
        ),
    )
    MetadataCatalog.get(name).set(
        json_file=h5_file,
        image_root=image_root,
        seg_root=None,
        panoptic_json=None,
        panoptic_root=None,
        box_only=True,
        split=split,
        **meta,
    )
