"""Panoptic quality (PQ / SQ / RQ, all / things / stuff) from one joint pixel histogram per image.

Shape shorthand: U predicted segments, N ground-truth segments, C categories.

The definitions are panopticapi's ``pq_compute`` to the letter:
- a (ground truth, prediction) pair of the same category matches when IoU > 0.5, with
  IoU = intersection / (predicted area + ground-truth area - intersection - predicted pixels on
  ground-truth void); the ground-truth area is the annotation's "area" (panopticapi reads it
  from the JSON), the predicted area is counted in the PNG; crowd ground truth never matches;
- an unmatched non-crowd ground-truth segment is a false negative;
- an unmatched prediction is a false positive unless more than half of it lies on ground-truth
  void or on the (last listed) crowd region of its category;
- per category PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP (0 without TP),
  RQ = TP / (TP + FP/2 + FN/2); a group averages over its categories with TP + FP + FN > 0
  (nan when there is none, where panopticapi would divide by zero).
The per-image histogram is the one the relation IoUs come from (image_pass.py), so the PNGs are
decoded once for both.
"""

import io
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

# columns of a PQ statistics array: [category, tp, fp, fn, iou sum] (float64; counts are exact)
PQ_COLUMNS = ("category", "tp", "fp", "fn", "iou")


def image_pq_stats(
    joint: np.ndarray,
    pred_categories: np.ndarray,
    gt_categories: np.ndarray,
    gt_areas: np.ndarray,
    gt_iscrowd: np.ndarray,
) -> np.ndarray:
    """Per-category PQ counts of one image -> [C', 5] rows (PQ_COLUMNS), one per category touched.

    joint [U + 2, N + 2]: pixel counts of (predicted segment, ground-truth segment) pairs; row U /
    column N count void (id 0) pixels, row U + 1 / column N + 1 pixels of ids listed nowhere
    (ignored, as panopticapi ignores pairs it has no segment for). A predicted segment without
    pixels is left out. pred_categories [U], gt_categories / gt_areas / gt_iscrowd [N].
    """
    u, n = len(pred_categories), len(gt_categories)
    pred_categories = np.asarray(pred_categories, dtype=np.int64)
    gt_categories = np.asarray(gt_categories, dtype=np.int64)
    gt_iscrowd = np.asarray(gt_iscrowd, dtype=bool)
    inter = joint[:u, :n]
    on_void = joint[:u, n]
    pred_area = joint[:u].sum(1)
    union = pred_area[:, None] + np.asarray(gt_areas, dtype=np.int64)[None, :] - inter
    union = union - on_void[:, None]
    candidate = (inter > 0) & (pred_area > 0)[:, None] & ~gt_iscrowd[None, :]
    candidate &= pred_categories[:, None] == gt_categories[None, :]
    candidate &= union != 0
    iou = np.divide(inter, union, out=np.zeros(inter.shape), where=candidate)
    matched = candidate & (iou > 0.5)
    mp, mg = np.nonzero(matched)
    gt_hit, pred_hit = matched.any(0), matched.any(1)

    crowd_of = {int(gt_categories[g]): g for g in np.flatnonzero(gt_iscrowd)}  # last one wins
    ignored_px = on_void.astype(np.float64)
    for cat, g in crowd_of.items():
        sel = pred_categories == cat
        ignored_px[sel] += inter[sel, g]
    unmatched = ~pred_hit & (pred_area > 0)
    fp = unmatched & ~(ignored_px / np.maximum(pred_area, 1) > 0.5)
    fn = ~gt_hit & ~gt_iscrowd

    cats = np.concatenate([gt_categories[mg], pred_categories[fp], gt_categories[fn]])
    if len(cats) == 0:
        return np.zeros((0, 5))
    kind = np.repeat([0, 1, 2], [len(mg), int(fp.sum()), int(fn.sum())])
    values, where = np.unique(cats, return_inverse=True)
    where = where.reshape(-1)
    out = np.zeros((len(values), 5))
    out[:, 0] = values
    for col in range(3):
        out[:, 1 + col] = np.bincount(where[kind == col], minlength=len(values))
    out[:, 4] = np.bincount(where[: len(mg)], weights=iou[mp, mg], minlength=len(values))
    return out


def accumulate(totals: np.ndarray, stats: np.ndarray) -> None:
    """Add one image's PQ rows (image_pq_stats) into totals [C, 4] (tp, fp, fn, iou sum)."""
    if len(stats):
        totals[stats[:, 0].astype(np.int64)] += stats[:, 1:]


def pq_summary(totals: np.ndarray, isthing: Sequence[bool]) -> "OrderedDict[str, float]":
    """PQ, SQ, RQ in percent for all / things (_th) / stuff (_st) from totals [C, 4]."""
    isthing = np.asarray(isthing, dtype=bool)
    out: "OrderedDict[str, float]" = OrderedDict()
    for suffix, group in (("", np.ones_like(isthing)), ("_th", isthing), ("_st", ~isthing)):
        tp, fp, fn, iou = totals[group].T
        used = tp + fp + fn > 0
        tp, fp, fn, iou = tp[used], fp[used], fn[used], iou[used]
        denom = tp + 0.5 * fp + 0.5 * fn
        sq = np.divide(iou, tp, out=np.zeros_like(iou), where=tp > 0)
        n = len(tp)
        for name, per_cat in (("PQ", iou / denom if n else tp), ("SQ", sq), ("RQ", tp / denom)):
            out[name + suffix] = float(per_cat.sum() / n * 100) if n else float("nan")
    return out


def encode_panoptic_png(seg: np.ndarray, segments_info: Sequence[Dict]) -> Tuple[bytes, List[Dict]]:
    """PNG bytes (COCO RGB ids) of seg [H, W] and the segments that have pixels.

    Keeps the first entry of each id that has pixels; pixels of unlisted ids become void (0).
    Returns (png_bytes, [{"id", "category_id"}]).
    """
    from .image_pass import ids_to_rgb

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
    Image.fromarray(ids_to_rgb(clean)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), kept


def panoptic_quality(
    gt_items: Sequence[Dict], pred_items: Sequence[Dict], categories: Sequence[Dict]
) -> "OrderedDict[str, float]":
    """PQ, SQ, RQ in percent for all / things (_th) / stuff (_st) categories.

    gt_items: [{"image_id", "file_name" (absolute PNG path), "segments_info": [{"id",
    "category_id", "iscrowd", "area" (counted in the PNG when absent)}]}]; pred_items:
    [{"image_id", "png" (bytes from encode_panoptic_png), "segments_info"}]; categories:
    [{"id", "name", "isthing"}]. The same per-image core as the evaluator (image_pass.py).
    """
    from .image_pass import decode_panoptic_png, joint_histogram

    preds = {str(p["image_id"]): p for p in pred_items}
    missing = [str(g["image_id"]) for g in gt_items if str(g["image_id"]) not in preds]
    if missing:
        raise ValueError(f"panoptic prediction missing for image(s) {missing[:5]}")
    position = {int(c["id"]): i for i, c in enumerate(categories)}
    totals = np.zeros((len(categories), 4))
    for g in gt_items:
        p = preds[str(g["image_id"])]
        gt_seg = decode_panoptic_png(g["file_name"])
        pred_seg = decode_panoptic_png(io.BytesIO(p["png"]))
        gsegs, psegs = g["segments_info"], p["segments_info"]
        gt_ids = np.asarray([int(s["id"]) for s in gsegs], dtype=np.int64)
        pred_ids = np.asarray([int(s["id"]) for s in psegs], dtype=np.int64)
        joint, _ = joint_histogram(pred_seg, pred_ids, gt_seg, gt_ids)
        png_areas = joint[:, : len(gt_ids)].sum(0)
        areas = [int(s["area"]) if "area" in s else png_areas[i] for i, s in enumerate(gsegs)]
        stats = image_pq_stats(
            joint,
            np.asarray([position[int(s["category_id"])] for s in psegs], dtype=np.int64),
            np.asarray([position[int(s["category_id"])] for s in gsegs], dtype=np.int64),
            np.asarray(areas, dtype=np.int64),
            np.asarray([int(s.get("iscrowd", 0)) == 1 for s in gsegs], dtype=bool),
        )
        accumulate(totals, stats)
    return pq_summary(totals, [int(c["isthing"]) == 1 for c in categories])
