"""Where a panoptic model loses ground-truth things, per class.

For each ground-truth thing: does some object query's mask fit it (a *proposal*: the best IoU
over the queries' masks), what does that query call it (its top class, "no object" included),
and is the thing named right in the final panoptic output (a segment of IoU >= the threshold).
An open-vocabulary split uses it to tell a novel class the queries never find from one they
find and then drop as "no object" or name as a base class (README, "Where OvD loses its novel
things"); ``tools/diagnose_queries.py`` runs it on a dataset.

:func:`capture_queries` records, per image, the class probabilities ``[Q, K+1]`` and mask logits
``[Q, H, W]`` that the SPADE model's ``panoptic_inference`` receives.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["capture_queries", "diagnose_image", "summarize_diagnosis"]


@contextmanager
def capture_queries(model) -> Iterator[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """Within the block, each call of ``model.panoptic_inference(class_probs, mask_logits)`` (one
    per image) appends ``(class_probs, mask_logits)`` (detached, on the CPU) to the yielded list;
    the model's own method is restored on exit."""
    records: List[Tuple[torch.Tensor, torch.Tensor]] = []
    original = model.panoptic_inference

    def recording(class_probs, mask_logits):
        records.append((class_probs.detach().cpu(), mask_logits.detach().cpu()))
        return original(class_probs, mask_logits)

    model.panoptic_inference = recording
    try:
        yield records
    finally:
        del model.panoptic_inference  # the instance attribute; the class's method shows again


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each mask of ``a`` [Q, H, W] with the mask ``b`` [H, W] (0 where both are empty)."""
    inter = (a & b[None]).reshape(len(a), -1).sum(1)
    union = (a | b[None]).reshape(len(a), -1).sum(1)
    return inter / np.maximum(union, 1)


def diagnose_image(
    gt_masks: np.ndarray,
    gt_classes: Sequence[int],
    class_probs,
    mask_logits,
    seg: np.ndarray,
    segments_info: Sequence[Dict],
    iou_threshold: float = 0.5,
    where: str = "?",
) -> List[Dict]:
    """One record per ground-truth segment.

    Args:
        gt_masks: bool [N, H, W]; ``gt_classes`` their N class indices.
        class_probs: [Q, K+1] (index K = no object); ``mask_logits``: [Q, H, W] at the same size
            as ``gt_masks`` (a query's mask is where its logit > 0).
        seg, segments_info: the model's final panoptic output (segment ids; ``category_id``).
        where: names the image in errors.
    Returns:
        dicts ``class``, ``proposal_iou`` (best over the queries), ``query_class`` (that query's
        top class; K = no object) and ``final_class`` (the class of the final segment with the
        largest IoU if that IoU >= ``iou_threshold``, else None).
    """
    gt_masks = np.asarray(gt_masks, dtype=bool)
    probs = torch.as_tensor(class_probs).float().numpy()
    masks = torch.as_tensor(mask_logits).numpy() > 0
    seg = np.asarray(seg)
    if len(gt_masks) != len(gt_classes):
        raise ValueError(f"image {where}: {len(gt_masks)} masks but {len(gt_classes)} classes")
    if masks.shape[1:] != gt_masks.shape[1:] or seg.shape != gt_masks.shape[1:]:
        raise ValueError(
            f"image {where}: query masks {masks.shape[1:]}, panoptic output {seg.shape} and "
            f"ground truth {gt_masks.shape[1:]} differ in size"
        )
    if len(probs) != len(masks):
        raise ValueError(f"image {where}: {len(probs)} query classes but {len(masks)} masks")
    final = [(seg == s["id"], int(s["category_id"])) for s in segments_info]
    out = []
    for gt, cls in zip(gt_masks, gt_classes):
        ious = _iou(masks, gt) if len(masks) else np.zeros(0)
        best = int(ious.argmax()) if len(ious) else -1
        final_class: Optional[int] = None
        if final:
            f_ious = _iou(np.stack([m for m, _ in final]), gt)
            k = int(f_ious.argmax())
            if f_ious[k] >= iou_threshold:
                final_class = final[k][1]
        out.append(
            {
                "class": int(cls),
                "proposal_iou": float(ious[best]) if best >= 0 else 0.0,
                "query_class": int(probs[best].argmax()) if best >= 0 else None,
                "final_class": final_class,
            }
        )
    return out


def summarize_diagnosis(
    records: Sequence[Dict], class_names: Sequence[str], iou_threshold: float = 0.5
) -> Dict[str, Dict]:
    """Per class name (in ``class_names`` order, classes with records only): ``count``,
    ``proposal_recall`` (share with a query mask of IoU >= the threshold), ``no_object`` (share
    whose best query's top class is "no object"), ``named_right`` (count named right in the final
    output), ``unmatched`` (count with no final segment) and ``named_as`` (the most frequent wrong
    final name, None when there is none)."""
    k = len(class_names)
    out = {}
    for c, name in enumerate(class_names):
        rows = [r for r in records if r["class"] == c]
        if not rows:
            continue
        wrong = Counter(
            class_names[r["final_class"]]
            for r in rows
            if r["final_class"] is not None and r["final_class"] != c
        )
        out[name] = {
            "count": len(rows),
            "proposal_recall": float(np.mean([r["proposal_iou"] >= iou_threshold for r in rows])),
            "no_object": float(np.mean([r["query_class"] == k for r in rows])),
            "named_right": sum(r["final_class"] == c for r in rows),
            "unmatched": sum(r["final_class"] is None for r in rows),
            "named_as": wrong.most_common(1)[0][0] if wrong else None,
        }
    return out
