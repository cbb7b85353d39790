"""The PSG benchmark's file-based prediction format: read it for scoring, write ours into it.

A submission folder holds ``relation.json``, a list with one entry per ground-truth test image (same
order): {"relations": [[subject_index, object_index, predicate], ...] ranked,
"segments_info": [{"id", "category_id"}], "pan_seg_file_name"}, and the panoptic PNGs (COCO RGB
ids) under ``panseg/``. category_id and predicate are 1-based there; indices address
segments_info entries. Any number of relations is read (no 20-row cap). An optional "image_id"
field is checked against the ground truth when present.
"""

import io
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .errors import EvaluationInputError
from .ground_truth import ground_truth_from_dict, is_int, read_json, read_panoptic_png
from .image_pass import evaluate_image, ids_to_rgb
from .predictions import prediction_from_output
from .report import write_json_atomic
from .sgg_metrics import GroundTruthGraph, ImageRecord, PredictedGraph

RELATION_JSON = "relation.json"


def load_relation_json(pred_dir: str) -> list:
    """The list in ``pred_dir/relation.json``; EvaluationInputError naming the file if unusable."""
    path = os.path.join(pred_dir, RELATION_JSON)
    if not os.path.isdir(pred_dir):
        raise EvaluationInputError(f"{pred_dir}: submission folder not found")
    if not os.path.isfile(path):
        raise EvaluationInputError(f"{path}: not found")
    entries = read_json(path, "submission")
    if not isinstance(entries, list):
        raise EvaluationInputError(
            f"{path}: top level must be a list, got {type(entries).__name__}"
        )
    return entries


def _segments(entry: Mapping, where: str, num_classes: int):
    """(ids [S], 1-based categories [S]) of an entry's segments_info, or a problem string."""
    segs = entry["segments_info"]
    if not isinstance(segs, list):
        return f"{where}: segments_info must be a list"
    for j, s in enumerate(segs):
        if not isinstance(s, Mapping) or not is_int(s.get("id")) or s["id"] < 1:
            return f"{where}: segments_info[{j}].id must be an integer >= 1"
        cat = s.get("category_id")
        if not is_int(cat) or not 1 <= cat <= num_classes:
            return f"{where}: segments_info[{j}].category_id {cat!r} outside 1..{num_classes}"
    ids = np.asarray([s["id"] for s in segs], dtype=np.int64)
    return ids, np.asarray([s["category_id"] for s in segs], dtype=np.int64)


def _relations(entry: Mapping, where: str, num_segments: int, num_predicates: int):
    """Relation rows [T, 3] (predicate still 1-based) of an entry, or a problem string."""
    rel = entry["relations"]
    if not isinstance(rel, list):
        return f"{where}: relations must be a list of [subject, object, predicate]"
    for r, row in enumerate(rel):
        if not isinstance(row, list) or len(row) != 3 or not all(is_int(v) for v in row):
            return (
                f"{where}: relations[{r}] must be 3 integers [subject, object, predicate], "
                f"got {row!r}"
            )
    rows = np.asarray(rel, dtype=np.int64).reshape(-1, 3)
    bad = np.flatnonzero((rows[:, :2] < 0).any(1) | (rows[:, :2] >= num_segments).any(1))
    if len(bad):
        return (
            f"{where}: relations rows {bad[:5].tolist()} point at a segment that does not "
            f"exist (segments_info has {num_segments})"
        )
    bad = np.flatnonzero((rows[:, 2] < 1) | (rows[:, 2] > num_predicates))
    if len(bad):
        return (
            f"{where}: relations rows {bad[:5].tolist()} have predicate "
            f"{rows[bad[:5], 2].tolist()} outside 1..{num_predicates}"
        )
    return rows


def read_entry(
    entry: Mapping,
    pred_dir: str,
    gt: GroundTruthGraph,
    num_classes: int,
    num_predicates: int,
) -> Tuple[Optional[PredictedGraph], List[str]]:
    """One relation.json entry as a PredictedGraph (0-based labels and predicates; PNG decoded).

    Returns (prediction or None, problems), each problem naming the image and the field.
    """
    where = f"image {gt.image_id}: {RELATION_JSON}"
    if not isinstance(entry, Mapping):
        return None, [f"{where}: entry is not an object"]
    missing = [k for k in ("relations", "segments_info", "pan_seg_file_name") if k not in entry]
    if missing:
        return None, [f"{where}: missing field {k!r}" for k in missing]
    problems = []
    if "image_id" in entry and str(entry["image_id"]) != gt.image_id:
        problems.append(f"{where}: entry image_id is {entry['image_id']!r} (order mismatch)")
    segments = _segments(entry, where, num_classes)
    if isinstance(segments, str):
        return None, problems + [segments]
    ids, cats = segments
    rows = _relations(entry, where, len(ids), num_predicates)
    if isinstance(rows, str):
        return None, problems + [rows]
    png = os.path.join(pred_dir, "panseg", str(entry["pan_seg_file_name"]))
    try:
        seg = read_panoptic_png(png, gt.image_id)
    except EvaluationInputError as e:
        return None, problems + [f"{e} (pan_seg_file_name)"]
    if seg.shape != (gt.height, gt.width):
        problems.append(
            f"image {gt.image_id}: pan_seg_file_name {png} is {seg.shape[0]}x{seg.shape[1]}, "
            f"ground truth is {gt.height}x{gt.width}"
        )
    if problems:
        return None, problems
    rows[:, 2] -= 1
    return PredictedGraph(segment_ids=ids, labels=cats - 1, relations=rows, seg=seg), []


def score_entry(
    record: Dict, entry, pred_dir: str, settings: Dict
) -> Tuple[Optional[ImageRecord], Optional[np.ndarray], List[str]]:
    """Score one submission entry against one ground-truth dict (load_psg_split format).

    settings: {"json_file", "num_classes", "num_predicates", "protocols", "iou_threshold",
    "max_k", "panoptic"}. Both PNGs are decoded once and checked against their segments_info
    both ways. Returns (ImageRecord, PQ rows, problems) as image_pass.evaluate_image.
    """
    try:
        gt = ground_truth_from_dict(record)
    except EvaluationInputError as e:
        return None, None, [f"ground truth: {e}"]
    pred, problems = read_entry(
        entry, pred_dir, gt, settings["num_classes"], settings["num_predicates"]
    )
    if pred is None:
        return None, None, problems
    png = os.path.join(pred_dir, "panseg", str(entry["pan_seg_file_name"]))
    files = (
        f"ground-truth PNG {record['pan_seg_file_name']}",
        os.path.basename(settings["json_file"]),
        f"PNG {png}",
        RELATION_JSON,
    )
    return evaluate_image(
        gt,
        pred,
        settings["protocols"],
        settings["iou_threshold"],
        settings["max_k"],
        settings["num_predicates"],
        settings["panoptic"],
        files,
    )


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
        Image.fromarray(ids_to_rgb(seg)).save(buf, format="PNG", compress_level=1)
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
