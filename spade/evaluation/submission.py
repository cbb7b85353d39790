"""The PSG benchmark's file-based prediction format: read it for scoring, write ours into it.

A submission folder holds ``relation.json``, a list with one entry per ground-truth test image (same
order): {"relations": [[subject_index, object_index, predicate], ...] ranked,
"segments_info": [{"id", "category_id"}], "pan_seg_file_name"}, and the panoptic PNGs (COCO RGB
ids) under ``panseg/``. category_id and predicate are 1-based there; indices address
segments_info entries. Any number of relations is read (no 20-row cap). An optional "image_id"
field is checked against the ground truth when present.
"""

import io
import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from .predictions import prediction_from_output
from .report import write_json_atomic
from .sgg_metrics import GroundTruthGraph, PredictedGraph


def load_relation_json(pred_dir: str) -> list:
    """The list in ``pred_dir/relation.json``; ValueError naming the file when unusable."""
    path = os.path.join(pred_dir, "relation.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not found")
    try:
        with open(path) as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(entries, list):
        raise ValueError(f"{path}: top level must be a list, got {type(entries).__name__}")
    return entries


def read_entry(
    entry: Mapping,
    pred_dir: str,
    gt: GroundTruthGraph,
    num_classes: int,
    num_predicates: int,
) -> Tuple[Optional[PredictedGraph], List[str]]:
    """One relation.json entry as a PredictedGraph (0-based labels and predicates).

    Returns (prediction or None, problems), each problem naming the image and the field.
    """
    where = f"image {gt.image_id}"
    problems = []
    if not isinstance(entry, Mapping):
        return None, [f"{where}: entry is not an object"]
    for key in ("relations", "segments_info", "pan_seg_file_name"):
        if key not in entry:
            problems.append(f"{where}: missing field {key!r}")
    if problems:
        return None, problems
    if "image_id" in entry and str(entry["image_id"]) != gt.image_id:
        problems.append(f"{where}: entry image_id is {entry['image_id']!r} (order mismatch)")
    png = os.path.join(pred_dir, "panseg", str(entry["pan_seg_file_name"]))
    seg = None
    try:
        with Image.open(png) as img:
            seg = rgb2id(np.asarray(img.convert("RGB")))
        if seg.shape != (gt.height, gt.width):
            problems.append(
                f"{where}: pan_seg_file_name {png} has size {seg.shape}, "
                f"ground truth is {(gt.height, gt.width)}"
            )
    except (OSError, ValueError) as e:
        problems.append(f"{where}: pan_seg_file_name {png} unreadable ({e})")
    try:
        ids = np.asarray([int(s["id"]) for s in entry["segments_info"]], dtype=np.int64)
        cats = np.asarray([int(s["category_id"]) for s in entry["segments_info"]], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as e:
        return None, problems + [
            f"{where}: segments_info entries need integer id, category_id ({e})"
        ]
    bad = cats[(cats < 1) | (cats > num_classes)]
    if len(bad):
        problems.append(
            f"{where}: segments_info category_id {bad[:5].tolist()} outside 1..{num_classes}"
        )
    try:
        rel = np.asarray(entry["relations"], dtype=np.float64).reshape(-1, 3)
    except (TypeError, ValueError) as e:
        return None, problems + [f"{where}: relations must be a list of [s, o, predicate] ({e})"]
    if not np.isfinite(rel).all() or (rel != np.round(rel)).any():
        return None, problems + [f"{where}: relations contain non-integer or NaN values"]
    rel = rel.astype(np.int64)
    out_seg = np.nonzero((rel[:, :2] < 0).any(1) | (rel[:, :2] >= len(ids)).any(1))[0]
    if len(out_seg):
        problems.append(
            f"{where}: relations rows {out_seg[:5].tolist()} point at a segment that does not "
            f"exist (segments_info has {len(ids)})"
        )
    out_p = np.nonzero((rel[:, 2] < 1) | (rel[:, 2] > num_predicates))[0]
    if len(out_p):
        problems.append(
            f"{where}: relations rows {out_p[:5].tolist()} have predicate "
            f"{rel[out_p[:5], 2].tolist()} outside 1..{num_predicates}"
        )
    if problems:
        return None, problems
    rel[:, 2] -= 1
    return PredictedGraph(segment_ids=ids, labels=cats - 1, relations=rel, seg=seg), []


def export_submission(
    predictions: Mapping[str, Mapping], dataset_dicts: Sequence[Dict], out_dir: str
) -> str:
    """Write model outputs in the benchmark's file-based format; returns the relation.json path.

    predictions maps image_id -> model output (docs/INTERFACES.md). Entries follow the order of
    ``dataset_dicts``, leaving out images without ground-truth relations as the benchmark's test
    loader does. Every relation row is written (no cap); labels and predicates become 1-based.
    """
    panseg = os.path.join(out_dir, "panseg")
    os.makedirs(panseg, exist_ok=True)
    entries = []
    for d in dataset_dicts:
        if len(d.get("relations", [])) == 0:
            continue
        image_id = str(d["image_id"])
        if image_id not in predictions:
            raise ValueError(f"image {image_id}: no prediction to export")
        pred = prediction_from_output(predictions[image_id], image_id)
        seg = pred.seg
        if seg.min(initial=0) < 0 or seg.max(initial=0) >= 256**3:
            raise ValueError(f"image {image_id}: panoptic_seg ids must lie in 0..256^3-1")
        name = f"{len(entries)}.png"
        buf = io.BytesIO()
        Image.fromarray(id2rgb(seg)).save(buf, format="PNG", compress_level=1)
        tmp = os.path.join(panseg, f".tmp_{name}")
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, os.path.join(panseg, name))
        rel = pred.relations.copy()
        rel[:, 2] += 1
        entries.append(
            {
                "image_id": image_id,
                "relations": rel.tolist(),
                "segments_info": [
                    {"id": int(i), "category_id": int(c) + 1}
                    for i, c in zip(pred.segment_ids, pred.labels)
                ],
                "pan_seg_file_name": name,
            }
        )
    path = os.path.join(out_dir, "relation.json")
    write_json_atomic(entries, path, indent=None)
    return path
