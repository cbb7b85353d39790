"""Panoptic inference: turn per-query class scores and masks into one non-overlapping segmentation.

Shape shorthand: Q queries, K classes (+1 no-object), H x W output resolution.
"""

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["panoptic_inference"]


def panoptic_inference(
    class_probs: Tensor,
    mask_logits: Tensor,
    is_thing: Sequence[bool],
    *,
    object_mask_threshold: float,
    overlap_threshold: float,
    reassign_dropped: bool = False,
) -> Tuple[Tensor, List[Dict], Tensor]:
    """Merge query predictions into a panoptic segmentation.

    A query is kept when its best class is not no-object and scores above
    ``object_mask_threshold``. Every pixel goes to the kept query with the highest
    ``score * mask probability``; a query keeps its segment only when it wins at least
    ``overlap_threshold`` of its own mask (prob >= 0.5). Queries of the same stuff class merge into
    one segment; every thing query gives its own segment.

    With ``reassign_dropped`` the merge repeats without the best-scoring query the overlap rule
    dropped, until every remaining query passes it: a dropped query's pixels then go to the
    next-best kept query instead of staying void, and a query that lost its pixels to a dropped
    one may be kept.

    Args:
        class_probs: [Q, K+1] class probabilities (last column = no-object).
        mask_logits: [Q, H, W] mask logits.
        is_thing: K flags, True for thing classes.
        object_mask_threshold, overlap_threshold, reassign_dropped: see above.

    Returns:
        seg int32 [H, W] (0 = void, segments numbered from 1),
        segments_info [{"id", "category_id", "isthing", "score"}],
        query_to_segment long [Q] (segment id of each query, 0 = dropped).
    """
    num_queries, num_classes = class_probs.shape[0], class_probs.shape[1] - 1
    if mask_logits.shape[0] != num_queries:
        raise ValueError(
            f"panoptic_inference: {num_queries} class rows but {mask_logits.shape[0]} masks"
        )
    if len(is_thing) != num_classes:
        raise ValueError(
            f"panoptic_inference: {len(is_thing)} is_thing flags for {num_classes} classes"
        )
    height, width = mask_logits.shape[-2:]
    seg = torch.zeros((height, width), dtype=torch.int32, device=mask_logits.device)
    query_to_segment = torch.zeros(num_queries, dtype=torch.long)
    segments_info: List[Dict] = []
    scores, labels = class_probs.max(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    kept = keep.nonzero().flatten()
    probs = mask_logits.sigmoid()
    while True:
        if kept.numel() == 0:
            return seg, segments_info, query_to_segment
        masks = probs[kept]
        owner = (scores[kept].view(-1, 1, 1) * masks).argmax(0)  # [H, W] index into kept
        own_masks = masks >= 0.5
        won = (
            owner[None] == torch.arange(len(kept), device=owner.device)[:, None, None]
        ) & own_masks
        own_area, won_area = own_masks.flatten(1).sum(1), won.flatten(1).sum(1)
        passes = (won_area > 0) & (won_area >= overlap_threshold * own_area)
        if not reassign_dropped or bool(passes.all()):
            break
        # drop the best-scoring failed query only: the queries it beat may pass without it
        failed = (~passes).nonzero().flatten()
        worst = failed[scores[kept[failed]].argmax()]
        kept = torch.cat([kept[:worst], kept[worst + 1 :]])
    stuff_segment: Dict[int, int] = {}
    for k, query in enumerate(kept.tolist()):
        if not bool(passes[k]):
            continue
        label = int(labels[query])
        thing = bool(is_thing[label])
        if not thing and label in stuff_segment:
            segment_id = stuff_segment[label]
        else:
            segment_id = len(segments_info) + 1
            segments_info.append(
                {
                    "id": segment_id,
                    "category_id": label,
                    "isthing": thing,
                    "score": float(scores[query]),
                }
            )
            if not thing:
                stuff_segment[label] = segment_id
        seg[won[k]] = segment_id
        query_to_segment[query] = segment_id
    return seg, segments_info, query_to_segment
