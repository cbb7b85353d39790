"""Vectorised scene-graph matching and recall: the core of the PSG / VG relation metrics.

Shape shorthand: N ground-truth segments, R ground-truth triplets, S predicted segment entries,
U distinct predicted masks, T ranked predicted relation rows, P predicates, I images, H x W image.

Definitions follow the PSG benchmark's evaluator (graph-constrained SGDet recall):
- a ground-truth triplet (subject, predicate, object) is matched by a predicted row when subject
  label, predicate and object label are equal and both subject and object IoU are >= 0.5 (mask IoU
  for PSG, box IoU for VG);
- R@K is the per-image share of ground-truth triplets matched by the first K rows, averaged over
  images; mR@K averages, per predicate, the per-image recall over the images containing it, then
  takes the mean over the whole predicate vocabulary (an absent predicate counts 0).
Scoring an image keeps only the rank of the first match of every ground-truth triplet, so every K
and every aggregate is derived later from small integer arrays.
"""

import functools
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

NO_MATCH = np.iinfo(np.int32).max  # rank stored for a ground-truth triplet that is never matched
PROTOCOLS = ("multi", "single")


@dataclass
class GroundTruthGraph:
    """Ground truth of one image.

    labels [N] contiguous category ids; relations [R, 3] (subject index, object index, predicate),
    exact duplicates removed; seg [H, W] segment-id map (None when evaluating boxes);
    segment_ids [N] ids of the segments in ``seg``; boxes [N, 4] xyxy (box evaluation only);
    iscrowd [N] bool and areas [N] (the annotation's "area", which panoptic quality uses) or None
    (not crowd; areas counted from ``seg``).
    """

    image_id: str
    height: int
    width: int
    labels: np.ndarray
    relations: np.ndarray
    segment_ids: np.ndarray
    seg: Optional[np.ndarray] = None
    boxes: Optional[np.ndarray] = None
    iscrowd: Optional[np.ndarray] = None
    areas: Optional[np.ndarray] = None


@dataclass
class PredictedGraph:
    """A system's prediction for one image, rows already ranked (row 0 is the best).

    segment_ids [S] mask key of every segment entry (its id in ``seg``; the file-based format may
    list the same mask twice); labels [S]; relations [T, 3] (subject entry, object entry,
    predicate); predicate_scores [T, P] or None (one-hot of the row's predicate);
    segment_scores [S] or None (all 1); boxes [S, 4] or None (tight boxes of the masks).
    """

    segment_ids: np.ndarray
    labels: np.ndarray
    relations: np.ndarray
    seg: Optional[np.ndarray] = None
    predicate_scores: Optional[np.ndarray] = None
    segment_scores: Optional[np.ndarray] = None
    boxes: Optional[np.ndarray] = None


@dataclass
class ImageRecord:
    """What one image contributes to the metrics (small; gathered across processes).

    Per ground-truth triplet [R]: predicate, subject / object labels, distant flag. Per protocol:
    number of relation rows, and the rank of the first graph-constrained (gc) and
    no-graph-constraint (ng) match (NO_MATCH if none).
    """

    image_id: str
    predicates: np.ndarray
    subject_labels: np.ndarray
    object_labels: np.ndarray
    distant: np.ndarray
    num_rows: Dict[str, int] = field(default_factory=dict)
    gc_rank: Dict[str, np.ndarray] = field(default_factory=dict)
    ng_rank: Dict[str, np.ndarray] = field(default_factory=dict)


def _index_map(seg: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Flat [H*W] index of each pixel's segment in ``ids`` (len(ids) for pixels of no listed id)."""
    flat = seg.reshape(-1)
    if len(ids) == 0:
        return np.zeros(flat.shape, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, flat), len(ids) - 1)
    return np.where(sorted_ids[pos] == flat, order[pos], len(ids))


def segment_iou(
    pred_seg: np.ndarray,
    pred_ids: np.ndarray,
    gt_seg: np.ndarray,
    gt_ids: np.ndarray,
    gt_index_map: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Exact full-resolution mask IoU of every (predicted, ground-truth) segment pair at once.

    Panoptic maps do not overlap, so all intersections come from one joint histogram of
    (predicted index, ground-truth index) pixel pairs. pred_ids [U] must be distinct;
    gt_index_map: _index_map(gt_seg, gt_ids) when the caller already has it.
    Returns [U, N] float64, computed as intersection / (area_p + area_g - intersection) like the
    benchmark (0 where both masks are empty).
    """
    num_p, num_g = len(pred_ids) + 1, len(gt_ids) + 1
    gt_index = _index_map(gt_seg, gt_ids) if gt_index_map is None else gt_index_map
    joint_index = _index_map(pred_seg, pred_ids) * num_g + gt_index
    joint = np.bincount(joint_index, minlength=num_p * num_g).reshape(num_p, num_g)
    inter = joint[:-1, :-1]
    union = joint[:-1].sum(1)[:, None] + joint[:, :-1].sum(0)[None, :] - inter
    return np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes [A, 4] x [B, 4] -> [A, B] float32, as the benchmark's bbox_overlaps."""
    a = np.asarray(boxes_a, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float32).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    overlap = wh[..., 0] * wh[..., 1]
    union = np.maximum(area_a[:, None] + area_b[None, :] - overlap, np.float32(1e-6))
    return overlap / union


def mask_boxes(seg: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes [len(ids), 4] of distinct ids (pixel edges: x1 = last column + 1); zeros
    for empty masks."""
    h, w = seg.shape
    idx = _index_map(seg, ids)
    boxes = np.zeros((len(ids), 4), dtype=np.float64)
    if len(ids) == 0:
        return boxes
    ys, xs = np.divmod(np.arange(h * w), w)
    for coord, lo, hi in ((xs, 0, 2), (ys, 1, 3)):
        low = np.full(len(ids) + 1, np.inf)
        high = np.full(len(ids) + 1, -np.inf)
        np.minimum.at(low, idx, coord)
        np.maximum.at(high, idx, coord)
        boxes[:, lo] = low[:-1]
        boxes[:, hi] = high[:-1] + 1
    boxes[~np.isfinite(boxes).all(1)] = 0
    return boxes


@functools.lru_cache(maxsize=8)
def _pixel_grid(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Flat float64 row and column coordinates [H*W] of an H x W image (cached, read-only)."""
    ys, xs = np.divmod(np.arange(h * w, dtype=np.float64), w)
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


def segment_centers(
    gt: GroundTruthGraph, box_only: bool, index_map: Optional[np.ndarray] = None
) -> np.ndarray:
    """Centre [N, 2] (x, y) of each ground-truth segment: mask centroid or box centre (NaN: empty).

    index_map: _index_map(gt.seg, gt.segment_ids) when the caller already has it.
    """
    if box_only:
        b = np.asarray(gt.boxes, dtype=np.float64).reshape(-1, 4)
        return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
    n = len(gt.segment_ids)
    idx = _index_map(gt.seg, gt.segment_ids) if index_map is None else index_map
    ys, xs = _pixel_grid(*gt.seg.shape)
    area = np.bincount(idx, minlength=n + 1)[:n].astype(np.float64)
    cx = np.bincount(idx, weights=xs, minlength=n + 1)[:n]
    cy = np.bincount(idx, weights=ys, minlength=n + 1)[:n]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([cx / area, cy / area], axis=1)


def canonical_rows(pred: PredictedGraph, protocol: str) -> Tuple[np.ndarray, np.ndarray]:
    """Rows a protocol scores, and the row each comes from.

    multi: every row as given (the benchmark). single: entries sharing a mask become the first such
    entry, and each (subject, object) pair keeps only its first (best-ranked) row, so a pair
    carries one predicate distribution. Returns rows [T', 3] and source row indices [T'].
    """
    rows = np.asarray(pred.relations, dtype=np.int64).reshape(-1, 3)
    if protocol == "multi":
        return rows, np.arange(len(rows))
    if protocol != "single":
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if len(rows) == 0:
        return rows, np.arange(0)
    _, first, inverse = np.unique(pred.segment_ids, return_index=True, return_inverse=True)
    canon = first[inverse.reshape(-1)]
    rows = np.stack([canon[rows[:, 0]], canon[rows[:, 1]], rows[:, 2]], axis=1)
    _, keep = np.unique(rows[:, 0] * len(canon) + rows[:, 1], return_index=True)
    keep = np.sort(keep)
    return rows[keep], keep


def _first_match_rank(
    sub: np.ndarray,
    obj: np.ndarray,
    predicate: np.ndarray,
    labels: np.ndarray,
    iou: np.ndarray,
    gt: GroundTruthGraph,
    threshold: float,
) -> np.ndarray:
    """Rank [R] of the first row (sub, obj, predicate: [T]) matching each ground-truth triplet."""
    gs, go, gp = gt.relations[:, 0], gt.relations[:, 1], gt.relations[:, 2]
    if len(sub) == 0:
        return np.full(len(gs), NO_MATCH, dtype=np.int32)
    match = (
        (predicate[:, None] == gp[None, :])
        & (labels[sub][:, None] == gt.labels[gs][None, :])
        & (labels[obj][:, None] == gt.labels[go][None, :])
    )
    match &= iou[sub][:, gs] >= threshold
    match &= iou[obj][:, go] >= threshold
    return np.where(match.any(0), match.argmax(0), NO_MATCH).astype(np.int32)


def score_image(
    gt: GroundTruthGraph,
    pred: PredictedGraph,
    protocols: Sequence[str] = ("multi",),
    iou_threshold: float = 0.5,
    max_k: int = 100,
    box_only: bool = False,
    num_predicates: Optional[int] = None,
    iou: Optional[np.ndarray] = None,
    centers: Optional[np.ndarray] = None,
) -> ImageRecord:
    """Match one image's prediction against its ground truth under each protocol.

    Graph-constrained rows are the first ``max_k`` rows (predicate = the row's predicate). The
    no-graph-constraint candidates are all (row, predicate) pairs scored by
    predicate_score x subject score x object score, ranked (stable) and cut to ``max_k``;
    without predicate_scores each row scores one-hot over ``num_predicates`` columns.
    iou [S, N] (mask IoU of every predicted entry with every ground-truth segment) and centers
    [N, 2] (segment_centers) may come from the caller's own pass over the maps (image_pass.py);
    they are computed here otherwise.
    """
    rel = np.asarray(gt.relations, dtype=np.int64).reshape(-1, 3)
    gt_index = None
    if centers is None and len(rel):
        gt_index = None if box_only else _index_map(gt.seg, gt.segment_ids)
        centers = segment_centers(gt, box_only, gt_index)
    elif centers is None:
        centers = np.zeros((0, 2))
    dist = np.hypot(*(centers[rel[:, 0]] - centers[rel[:, 1]]).T) if len(rel) else np.zeros(0)
    with np.errstate(invalid="ignore"):
        distant = np.asarray(dist > gt.width / 3.0, dtype=bool)
    labels = np.asarray(gt.labels, dtype=np.int64)
    record = ImageRecord(
        image_id=gt.image_id,
        predicates=rel[:, 2].copy(),
        subject_labels=labels[rel[:, 0]],
        object_labels=labels[rel[:, 1]],
        distant=distant,
    )
    if len(rel) == 0:
        for protocol in protocols:
            record.num_rows[protocol] = len(pred.relations)
            record.gc_rank[protocol] = record.ng_rank[protocol] = np.zeros(0, dtype=np.int32)
        return record
    gt = GroundTruthGraph(**{**gt.__dict__, "relations": rel, "labels": labels})
    keys = np.asarray(pred.segment_ids, dtype=np.int64)
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    if iou is None and box_only:
        if pred.boxes is None:
            boxes = mask_boxes(pred.seg, unique_keys)[inverse.reshape(-1)]
        else:
            boxes = pred.boxes
        iou = box_iou(boxes, gt.boxes)
    elif iou is None:
        iou = segment_iou(pred.seg, unique_keys, gt.seg, gt.segment_ids, gt_index)
        iou = iou[inverse.reshape(-1)]
    pred_labels = np.asarray(pred.labels, dtype=np.int64)
    seg_scores = (
        np.ones(len(keys)) if pred.segment_scores is None else np.asarray(pred.segment_scores)
    )
    for protocol in protocols:
        rows, source = canonical_rows(pred, protocol)
        record.num_rows[protocol] = len(rows)
        top = rows[:max_k]
        record.gc_rank[protocol] = _first_match_rank(
            top[:, 0], top[:, 1], top[:, 2], pred_labels, iou, gt, iou_threshold
        )
        if pred.predicate_scores is None:
            num_p = int(max(rows[:, 2].max(initial=-1), gt.relations[:, 2].max()) + 1)
            num_p = max(num_p, num_predicates or 0)
            pscores = np.zeros((len(rows), num_p))
            pscores[np.arange(len(rows)), rows[:, 2]] = 1.0
        else:
            pscores = np.asarray(pred.predicate_scores, dtype=np.float64)[source]
        cand = pscores * (seg_scores[rows[:, 0]] * seg_scores[rows[:, 1]])[:, None]
        order = np.argsort(-cand.reshape(-1), kind="stable")[:max_k]
        row_idx, ng_pred = np.divmod(order, cand.shape[1])
        record.ng_rank[protocol] = _first_match_rank(
            rows[row_idx, 0], rows[row_idx, 1], ng_pred, pred_labels, iou, gt, iou_threshold
        )
    return record
