"""Helpers of the data-layer tests: a hand-made PSG-format dataset on disk."""

import json
import os

import h5py
import numpy as np
from PIL import Image

THINGS = ["cat", "dog"]
STUFF = ["grass"]
PREDICATES = ["left of", "right of", "on"]


def _write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def id_png(ids):
    """[H, W] ids -> COCO RGB encoded [H, W, 3] uint8."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def standard_record(image_id, relations, ids=(1, 2, 300)):
    """A 16 x 24 image: cat (id ids[0], x<8, rows<8), dog (ids[1], x>=16, rows<8), grass below."""
    return {
        "file_name": f"img/{image_id}.png",
        "height": 16,
        "width": 24,
        "image_id": image_id,
        "pan_seg_file_name": f"pan/{image_id}.png",
        "segments_info": [
            {"id": ids[0], "category_id": 0, "iscrowd": 0, "isthing": 1, "area": 64},
            {"id": ids[1], "category_id": 1, "iscrowd": 0, "isthing": 1, "area": 64},
            {"id": ids[2], "category_id": 2, "iscrowd": 0, "isthing": 0, "area": 256},
        ],
        "relations": relations,
        "annotations": [
            {"bbox": [0, 0, 8, 8], "bbox_mode": 0, "category_id": 0},
            {"bbox": [16, 0, 24, 8], "bbox_mode": 0, "category_id": 1},
            {"bbox": [0, 8, 24, 16], "bbox_mode": 0, "category_id": 2},
        ],
        "coco_image_id": 0,
    }


def write_dataset(
    root, records, test_ids, val_ids=None, classes=None, image_root=None, seg_root=None
):
    """Write psg.json plus matching image / panoptic PNGs for ``standard_record`` records;
    ``classes`` overrides the class lists (default THINGS / STUFF / PREDICATES). Images and PNGs go
    under ``image_root`` / ``seg_root`` (default ``root``), psg.json under ``root``."""
    classes = classes or {
        "thing_classes": THINGS,
        "stuff_classes": STUFF,
        "predicate_classes": PREDICATES,
    }
    psg = dict(classes, data=records, test_image_ids=test_ids)
    if val_ids is not None:
        psg["val_image_ids"] = val_ids
    for rec in records:
        ids = np.zeros((16, 24), dtype=np.int64)
        segs = rec["segments_info"]
        ids[:8, :8], ids[:8, 16:], ids[8:, :] = segs[0]["id"], segs[1]["id"], segs[2]["id"]
        colours = np.zeros((16, 24, 3), dtype=np.uint8)
        colours[:8, :8], colours[:8, 16:], colours[8:] = (255, 0, 0), (0, 0, 255), (0, 255, 0)
        _write_png(os.path.join(image_root or root, rec["file_name"]), colours)
        _write_png(os.path.join(seg_root or root, rec["pan_seg_file_name"]), id_png(ids))
    path = os.path.join(root, "psg.json")
    with open(path, "w") as f:
        json.dump(psg, f)
    return path


H5 = {
    "split": [0, 0, 0, 2, 2],
    "labels": [[1], [2], [1], [3], [2], [1], [2]],
    "boxes_1024": [
        [512, 256, 512, 256],
        [100, 100, 50, 50],
        [10, 10, 20, 20],
        [50, 50, 20, 20],
        [30, 30, 10, 10],
        [40, 40, 20, 20],
        [80, 80, 20, 20],
    ],
    "img_to_first_box": [0, 2, 4, 5, -1],
    "img_to_last_box": [1, 3, 4, 6, -1],
    "img_to_first_rel": [0, 2, -1, 3, -1],
    "img_to_last_rel": [1, 2, -1, 5, -1],
    "relationships": [[0, 1], [0, 1], [2, 3], [5, 6], [5, 6], [6, 5]],
    "predicates": [[1], [1], [2], [1], [1], [2]],
}


def write_vg(tmp_path, h5=None, images=None):
    """Write a tiny VG150 (h5, dicts json, image_data json) into ``tmp_path``; returns paths."""
    h5 = dict(H5, **(h5 or {}))
    with h5py.File(tmp_path / "vg.h5", "w") as f:
        for k, v in h5.items():
            f.create_dataset(k, data=np.asarray(v))
    with open(tmp_path / "dicts.json", "w") as f:
        json.dump(
            {
                "idx_to_label": {"1": "cat", "2": "dog", "3": "bed"},
                "idx_to_predicate": {"1": "on", "2": "near"},
            },
            f,
        )
    if images is None:
        images = [
            {"image_id": 10, "width": 200, "height": 100},
            {"image_id": 1592, "width": 5, "height": 5},
        ]  # a known corrupt image, skipped
        images += [{"image_id": i, "width": 100, "height": 100} for i in (11, 12, 13, 14)]
    with open(tmp_path / "image_data.json", "w") as f:
        json.dump(images, f)
    return str(tmp_path / "vg.h5"), str(tmp_path / "dicts.json"), str(tmp_path / "image_data.json")
