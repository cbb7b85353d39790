"""Panoptic quality (PQ / SQ / RQ, all / things / stuff) through panopticapi's own code."""

import contextlib
import io
import os
import tempfile
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import numpy as np
from panopticapi.evaluation import PQStat, pq_compute_multi_core, pq_compute_single_core
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

# below this many images the per-image core runs in this process (no worker pool start-up)
_POOL_MIN_IMAGES = 64


def encode_panoptic_png(seg: np.ndarray, segments_info: Sequence[Dict]) -> Tuple[bytes, List[Dict]]:
    """PNG bytes (COCO RGB ids) of seg [H, W] and the segments pq_compute will accept.

    Keeps the first entry of each id that has pixels; pixels of unlisted ids become void (0).
    Returns (png_bytes, [{"id", "category_id"}]).
    """
    seg = np.asarray(seg, dtype=np.int64)
    present = set(np.unique(seg).tolist())
    kept, seen = [], set()
    for s in segments_info:
        sid = int(s["id"])
        if sid in present and sid not in seen and sid != 0:
            seen.add(sid)
            kept.append({"id": sid, "category_id": int(s["category_id"])})
    clean = np.where(np.isin(seg, list(seen)), seg, 0)
    buf = io.BytesIO()
    Image.fromarray(id2rgb(clean)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), kept


def _gt_segments(item: Dict) -> List[Dict]:
    """Ground-truth segments for pq_compute; "area" (which it reads from the JSON) is counted
    from the PNG when the dataset dict lacks it."""
    segs = item["segments_info"]
    areas = {}
    if any("area" not in s for s in segs):
        with Image.open(item["file_name"]) as img:
            ids, counts = np.unique(rgb2id(np.asarray(img.convert("RGB"))), return_counts=True)
        areas = dict(zip(ids.tolist(), counts.tolist()))
    return [
        {
            "id": int(s["id"]),
            "category_id": int(s["category_id"]),
            "iscrowd": int(s.get("iscrowd", 0)),
            "area": int(s["area"]) if "area" in s else int(areas.get(int(s["id"]), 0)),
        }
        for s in segs
    ]


def panoptic_quality(
    gt_items: Sequence[Dict], pred_items: Sequence[Dict], categories: Sequence[Dict]
) -> "OrderedDict[str, float]":
    """PQ, SQ, RQ in percent for all / things (_th) / stuff (_st) categories.

    gt_items: [{"image_id", "file_name" (absolute PNG path), "segments_info": [{"id",
    "category_id", "iscrowd"}]}]; pred_items: [{"image_id", "png" (bytes from
    encode_panoptic_png), "segments_info"}]; categories: [{"id", "name", "isthing"}].
    Runs panopticapi's per-image PQ core and category averaging on files written to a temporary
    folder; a group without any segment gets nan instead of a division by zero.
    """
    preds = {str(p["image_id"]): p for p in pred_items}
    missing = [str(g["image_id"]) for g in gt_items if str(g["image_id"]) not in preds]
    if missing:
        raise ValueError(f"panoptic prediction missing for image(s) {missing[:5]}")
    cats = {int(c["id"]): dict(c, id=int(c["id"])) for c in categories}
    with tempfile.TemporaryDirectory(prefix="spade_pq_") as pred_dir:
        pairs = []
        for i, g in enumerate(gt_items):
            p = preds[str(g["image_id"])]
            name = f"{i}.png"
            with open(os.path.join(pred_dir, name), "wb") as f:
                f.write(p["png"])
            gt_ann = {
                "image_id": str(g["image_id"]),
                "file_name": os.path.abspath(g["file_name"]),
                "segments_info": _gt_segments(g),
            }
            pred_ann = {
                "image_id": str(g["image_id"]),
                "file_name": name,
                "segments_info": [dict(s) for s in p["segments_info"]],
            }
            pairs.append((gt_ann, pred_ann))
        with contextlib.redirect_stdout(io.StringIO()):
            if len(pairs) < _POOL_MIN_IMAGES:
                stat = PQStat()
                if pairs:
                    stat += pq_compute_single_core(0, pairs, "/", pred_dir, cats)
            else:
                stat = pq_compute_multi_core(pairs, "/", pred_dir, cats)
    out: "OrderedDict[str, float]" = OrderedDict()
    for suffix, isthing in (("", None), ("_th", True), ("_st", False)):
        try:
            res, _ = stat.pq_average(cats, isthing=isthing)
            vals = (res["pq"], res["sq"], res["rq"])
        except ZeroDivisionError:
            vals = (float("nan"),) * 3
        for name, v in zip(("PQ", "SQ", "RQ"), vals):
            out[name + suffix] = float(v) * 100
    return out
