"""Model outputs (docs/INTERFACES.md) as PredictedGraph, and checks of predictions for bad input."""

from typing import Dict, List, Mapping

import numpy as np

from .sgg_metrics import GroundTruthGraph, PredictedGraph


def _numpy(x) -> np.ndarray:
    """A tensor or array-like as a numpy array (tensors are detached and moved to CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_prediction(
    pred: PredictedGraph,
    gt: GroundTruthGraph,
    num_classes: int,
    num_predicates: int,
    box_only: bool = False,
) -> List[str]:
    """Every problem of one prediction, each naming the image and the field; [] when sound."""
    where = f"image {gt.image_id}"
    problems = []
    if not box_only or pred.boxes is None:
        if pred.seg is None:
            problems.append(f"{where}: panoptic_seg missing")
        elif tuple(pred.seg.shape) != (gt.height, gt.width):
            problems.append(
                f"{where}: panoptic_seg has size {tuple(pred.seg.shape)}, "
                f"ground truth is {(gt.height, gt.width)}"
            )
    labels = np.asarray(pred.labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][:5].tolist()
        problems.append(f"{where}: segments_info category_id {bad} outside 0..{num_classes - 1}")
    rel = np.asarray(pred.relations)
    if rel.ndim != 2 or (len(rel) and rel.shape[1] != 3):
        problems.append(f"{where}: relations must be [T, 3], got shape {rel.shape}")
        return problems
    if len(rel):
        s = len(pred.segment_ids)
        bad_seg = np.nonzero((rel[:, :2] < 0).any(1) | (rel[:, :2] >= s).any(1))[0]
        if len(bad_seg):
            problems.append(
                f"{where}: relations rows {bad_seg[:5].tolist()} point at a segment that does "
                f"not exist (segments 0..{s - 1})"
            )
        bad_p = np.nonzero((rel[:, 2] < 0) | (rel[:, 2] >= num_predicates))[0]
        if len(bad_p):
            problems.append(
                f"{where}: relations rows {bad_p[:5].tolist()} have a predicate outside "
                f"0..{num_predicates - 1}"
            )
    if pred.predicate_scores is not None:
        ps = np.asarray(pred.predicate_scores)
        if ps.shape != (len(rel), num_predicates):
            problems.append(
                f"{where}: relations.predicate_scores has shape {ps.shape}, "
                f"expected {(len(rel), num_predicates)}"
            )
        elif not np.isfinite(ps).all():
            problems.append(f"{where}: relations.predicate_scores contains NaN or inf")
    if pred.segment_scores is not None and not np.isfinite(pred.segment_scores).all():
        problems.append(f"{where}: segments_info score contains NaN or inf")
    return problems


def prediction_from_output(output: Mapping, image_id: str) -> PredictedGraph:
    """PredictedGraph of one model output {"panoptic_seg": (seg, segments_info), "relations": ...}.

    Relation triplets name segment ids; they become segment entry indices here. A missing
    "relations" means no relation rows. Segments may carry "bbox" (xyxy, used by box-IoU
    evaluation instead of the tight box of the visible mask). Raises ValueError naming the image
    and the field for an unknown segment id, duplicated segment ids, NaN or unsorted triplet
    scores.
    """
    where = f"image {image_id}"
    if "panoptic_seg" not in output:
        raise ValueError(f"{where}: output has no 'panoptic_seg'")
    seg, segments_info = output["panoptic_seg"]
    if segments_info is None:
        raise ValueError(f"{where}: panoptic_seg segments_info is None (need segment ids)")
    seg = _numpy(seg).astype(np.int64)
    ids = np.asarray([int(s["id"]) for s in segments_info], dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{where}: panoptic_seg segments_info repeats a segment id")
    if len(ids) and ids.min() < 1:
        raise ValueError(f"{where}: panoptic_seg segments_info id must be >= 1 (0 is void)")
    labels = np.asarray([int(s["category_id"]) for s in segments_info], dtype=np.int64)
    scores = np.asarray([float(s.get("score", 1.0)) for s in segments_info], dtype=np.float64)
    rel_out: Dict = output.get("relations") or {}
    triplets = _numpy(rel_out.get("triplets", np.zeros((0, 3)))).astype(np.int64).reshape(-1, 3)
    rows = np.zeros((len(triplets), 3), dtype=np.int64)
    if len(triplets):
        order = np.argsort(ids)
        pos = np.minimum(np.searchsorted(ids[order], triplets[:, :2]), max(len(ids) - 1, 0))
        found = (
            ids[order][pos] == triplets[:, :2] if len(ids) else np.zeros((len(triplets), 2), bool)
        )
        bad = np.nonzero(~found.all(1))[0]
        if len(bad):
            raise ValueError(
                f"{where}: relations.triplets rows {bad[:5].tolist()} name segment ids "
                f"{triplets[bad[:5], :2].tolist()} not in panoptic_seg segments_info"
            )
        rows[:, :2] = order[pos]
        rows[:, 2] = triplets[:, 2]
        scores_t = _numpy(rel_out.get("scores", np.zeros(len(triplets)))).astype(np.float64)
        if scores_t.shape != (len(triplets),):
            raise ValueError(f"{where}: relations.scores has shape {scores_t.shape}, expected [T]")
        if not np.isfinite(scores_t).all():
            raise ValueError(f"{where}: relations.scores contains NaN or inf")
        if (np.diff(scores_t) > 0).any():
            raise ValueError(f"{where}: relations.scores are not sorted in descending order")
    pscores = rel_out.get("predicate_scores")
    boxes = None
    if segments_info and all("bbox" in s for s in segments_info):
        boxes = np.asarray([s["bbox"] for s in segments_info], dtype=np.float64).reshape(-1, 4)
    return PredictedGraph(
        boxes=boxes,
        segment_ids=ids,
        labels=labels,
        relations=rows,
        seg=seg,
        predicate_scores=None if pscores is None else _numpy(pscores).astype(np.float64),
        segment_scores=scores,
    )
