"""Ground truth for relation evaluation: from registered dataset dicts or from a psg.json file."""

import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from panopticapi.utils import rgb2id
from PIL import Image

from .sgg_metrics import GroundTruthGraph


def read_panoptic_png(path: str) -> np.ndarray:
    """Segment-id map [H, W] int32 of a COCO-panoptic RGB PNG (id = R + 256 G + 256^2 B)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"panoptic PNG not found: {path}")
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    return rgb2id(rgb)


def unique_triplets(relations) -> np.ndarray:
    """[R, 3] int64 with exact duplicate rows removed, first occurrences kept in order."""
    rel = np.asarray(relations, dtype=np.int64).reshape(-1, 3)
    if len(rel) == 0:
        return rel
    _, first = np.unique(rel, axis=0, return_index=True)
    return rel[np.sort(first)]


def ground_truth_from_dict(record: Dict, box_only: bool = False) -> GroundTruthGraph:
    """Build the evaluation ground truth of one dataset dict (docs/INTERFACES.md format).

    Labels from segments_info category_id; relations de-duplicated (a pair may keep several
    predicates); masks from the panoptic PNG, or boxes from segments_info "bbox" when box_only.
    """
    image_id = str(record.get("image_id"))
    segs = record.get("segments_info", [])
    rel = unique_triplets(record.get("relations", []))
    if len(rel) and (rel[:, :2].min() < 0 or rel[:, :2].max() >= len(segs)):
        raise ValueError(
            f"image {image_id}: ground-truth 'relations' index a segment outside "
            f"segments_info (0..{len(segs) - 1})"
        )
    ids = np.asarray([s["id"] for s in segs], dtype=np.int64)
    labels = np.asarray([s["category_id"] for s in segs], dtype=np.int64)
    gt = GroundTruthGraph(
        image_id=image_id,
        height=int(record["height"]),
        width=int(record["width"]),
        labels=labels,
        relations=rel,
        segment_ids=ids,
    )
    if box_only:
        try:
            gt.boxes = np.asarray([s["bbox"] for s in segs], dtype=np.float64).reshape(-1, 4)
        except KeyError as e:
            raise ValueError(f"image {image_id}: segments_info lacks 'bbox' (box_only)") from e
    else:
        gt.seg = read_panoptic_png(record["pan_seg_file_name"])
        if gt.seg.shape != (gt.height, gt.width):
            raise ValueError(
                f"image {image_id}: panoptic PNG {record['pan_seg_file_name']} is "
                f"{gt.seg.shape}, dataset dict says {(gt.height, gt.width)}"
            )
    return gt


def load_psg_split(
    json_file: str, seg_root: str, split: str = "test"
) -> Tuple[List[Dict], Dict[str, List[str]]]:
    """Read a psg.json the way the benchmark's test loader does.

    Images without relations are dropped first, then ``split`` is taken in file order ("test":
    image_id in test_image_ids; "val": in val_image_ids when the file has them; "train": the
    others). Segment labels come from
    ``annotations`` (one per segment) when present. Returns (dataset dicts in the
    docs/INTERFACES.md format with absolute pan_seg_file_name, class names
    {"thing_classes", "stuff_classes", "predicate_classes"}).
    """
    if split not in ("test", "val", "train"):
        raise ValueError(f"split must be 'test', 'val' or 'train', got {split!r}")
    with open(json_file) as f:
        data = json.load(f)
    for key in ("data", "thing_classes", "stuff_classes", "predicate_classes"):
        if key not in data:
            raise ValueError(f"{json_file}: missing top-level key {key!r}")
    split_ids = {
        name: set(str(i) for i in data.get(f"{name}_image_ids", [])) for name in ("test", "val")
    }
    if split == "val" and "val_image_ids" not in data:
        raise ValueError(f"{json_file}: split 'val' asked, but the file has no val_image_ids")
    num_things = len(data["thing_classes"])
    records = []
    for d in data["data"]:
        if len(d.get("relations", [])) == 0:
            continue
        image_id = str(d["image_id"])
        if split == "train":
            if image_id in split_ids["test"] or image_id in split_ids["val"]:
                continue
        elif image_id not in split_ids[split]:
            continue
        anns = d.get("annotations") or []
        segments = []
        for i, s in enumerate(d["segments_info"]):
            cat = int(anns[i]["category_id"]) if i < len(anns) else int(s["category_id"])
            segments.append(
                {
                    "id": int(s["id"]),
                    "category_id": cat,
                    "iscrowd": int(s.get("iscrowd", 0)),
                    "isthing": bool(s.get("isthing", cat < num_things)),
                    "area": int(s.get("area", 0)),
                }
            )
        records.append(
            {
                "image_id": str(d["image_id"]),
                "height": int(d["height"]),
                "width": int(d["width"]),
                "file_name": d.get("file_name", ""),
                "pan_seg_file_name": os.path.join(seg_root, d["pan_seg_file_name"]),
                "segments_info": segments,
                "relations": [list(map(int, r)) for r in d["relations"]],
            }
        )
    names = {k: list(data[k]) for k in ("thing_classes", "stuff_classes", "predicate_classes")}
    return records, names


def ov_split_indices(
    ov_split: Dict[str, Sequence[str]], class_names: Sequence[str], predicate_names: Sequence[str]
) -> Tuple[List[int], List[int]]:
    """(novel predicate indices, novel object category indices) of a split given by names."""
    out = []
    for key, vocab in (("novel_predicates", predicate_names), ("novel_objects", class_names)):
        index = {n: i for i, n in enumerate(vocab)}
        unknown = [n for n in ov_split.get(key, []) if n not in index]
        if unknown:
            raise ValueError(f"ov_split[{key!r}] names unknown classes: {unknown}")
        out.append(sorted(index[n] for n in ov_split.get(key, [])))
    return out[0], out[1]
