"""Helpers of the data-layer tests: a hand-made PSG-format dataset on disk."""

import json
import os

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


def write_dataset(root, records, test_ids, val_ids=None, pngs=True):
    """Write psg.json plus matching image / panoptic PNGs for ``standard_record`` records."""
    psg = {
        "data": records,
        "thing_classes": THINGS,
        "stuff_classes": STUFF,
        "predicate_classes": PREDICATES,
        "test_image_ids": test_ids,
    }
    if val_ids is not None:
        psg["val_image_ids"] = val_ids
    for rec in records if pngs else []:
        ids = np.zeros((16, 24), dtype=np.int64)
        segs = rec["segments_info"]
        ids[:8, :8], ids[:8, 16:], ids[8:, :] = segs[0]["id"], segs[1]["id"], segs[2]["id"]
        colours = np.zeros((16, 24, 3), dtype=np.uint8)
        colours[:8, :8], colours[:8, 16:], colours[8:] = (255, 0, 0), (0, 0, 255), (0, 255, 0)
        _write_png(os.path.join(root, rec["file_name"]), colours)
        _write_png(os.path.join(root, rec["pan_seg_file_name"]), id_png(ids))
    path = os.path.join(root, "psg.json")
    with open(path, "w") as f:
        json.dump(psg, f)
    return path
