"""Relation query construction helpers: pair selection, mask boxes, pair geometry.

Shape shorthand: B batch, Q object queries, M pairs, h x w mask resolution.
"""

import torch
from torch import Tensor

__all__ = ["select_pairs", "mask_boxes", "pair_geometry", "GEOMETRY_DIM"]

GEOMETRY_DIM = 14  # subject box 4, object box 4, centre offset 2, log size ratio 2, distance, IoU


def select_pairs(ranking: Tensor, num_pairs: int) -> Tensor:
    """Top-M (subject, object) query pairs of one image, self pairs excluded.

    Args:
        ranking: [Q, Q] pair ranking scores (higher = selected first); the diagonal is ignored.
        num_pairs: M; clamped to Q * (Q - 1).
    Returns:
        long [min(M, Q(Q-1)), 2] pairs ordered by descending score (ties by flat index).
    """
    Q = ranking.shape[0]
    m = min(num_pairs, Q * (Q - 1))
    if m <= 0:
        return torch.zeros(0, 2, dtype=torch.long, device=ranking.device)
    eye = torch.eye(Q, dtype=torch.bool, device=ranking.device)
    flat = ranking.float().masked_fill(eye, float("-inf")).flatten()
    # a finite stand-in keeps -inf rows (queries scored 0) orderable without picking self pairs
    flat = torch.where(torch.isneginf(flat) & ~eye.flatten(), torch.full_like(flat, -1e30), flat)
    idx = torch.sort(flat, descending=True, stable=True).indices[:m]
    return torch.stack([idx // Q, idx % Q], dim=1)


def mask_boxes(masks: Tensor) -> Tensor:
    """Tight boxes of binary masks [..., h, w] in [0, 1] coordinates (x0, y0, x1, y1) [..., 4];
    an empty mask gets the zero box."""
    h, w = masks.shape[-2:]
    rows = masks.any(dim=-1)  # [..., h]
    cols = masks.any(dim=-2)  # [..., w]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    big = max(h, w) + 1
    y0 = torch.where(rows, ar_h, big).amin(dim=-1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=-1) + 1
    x0 = torch.where(cols, ar_w, big).amin(dim=-1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=-1) + 1
    boxes = torch.stack([x0 / w, y0 / h, x1 / w, y1 / h], dim=-1).float()
    return torch.where(rows.any(dim=-1, keepdim=True), boxes, torch.zeros_like(boxes))


def pair_geometry(subject_boxes: Tensor, object_boxes: Tensor, min_size: float = 1e-3) -> Tensor:
    """Geometry features [M, GEOMETRY_DIM] of pairs from boxes [M, 4] in [0, 1] coordinates:
    both boxes, object centre minus subject centre (dx, dy), log(w_o / w_s), log(h_o / h_s),
    centre distance and box IoU."""
    s, o = subject_boxes, object_boxes
    s_wh = (s[:, 2:] - s[:, :2]).clamp(min=min_size)
    o_wh = (o[:, 2:] - o[:, :2]).clamp(min=min_size)
    delta = (o[:, :2] + o[:, 2:]) / 2 - (s[:, :2] + s[:, 2:]) / 2
    log_ratio = torch.log(o_wh / s_wh)
    distance = delta.norm(dim=-1, keepdim=True)
    lt = torch.maximum(s[:, :2], o[:, :2])
    rb = torch.minimum(s[:, 2:], o[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_s = (s[:, 2:] - s[:, :2]).prod(dim=-1)
    area_o = (o[:, 2:] - o[:, :2]).prod(dim=-1)
    iou = inter / (area_s + area_o - inter).clamp(min=min_size**2)
    return torch.cat([s, o, delta, log_ratio, distance, iou[:, None]], dim=-1)
