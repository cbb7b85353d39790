"""Spatial-semantic graph G over object queries (SPADE stage 2, RGT input).

Shape shorthand: B batch, Q object queries, C query channels, h x w mask resolution,
R the side of the downsampled masks (``RELATION.GRAPH_RESOLUTION``).

Two queries are neighbours (G = 1) when

* ``mode="fixed"`` (the paper): their predicted masks (sigmoid > 0.5 at R x R) touch or lie within
  ``adjacency_distance`` pixels of each other (Chebyshev distance at R x R), OR the cosine
  similarity of their query features exceeds ``eta``;
* ``mode="knn"`` (adaptive, no tuned thresholds): each query links to its ``k`` nearest other
  queries under the score ``cos(f_i, f_j) - ||c_i - c_j||`` (``c`` = mask centroid in [0, 1]^2
  image coordinates, a query with an empty mask is placed sqrt(2) away from every other), and the
  relation is symmetrised (i ~ j when either picked the other).

The diagonal of G is always False: a query is neither its own neighbour nor its own non-neighbour.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "binary_masks_at",
    "mask_adjacency",
    "feature_similarity",
    "mask_centroids",
    "knn_graph",
    "build_spatial_semantic_graph",
]

GRAPH_MODES = ("fixed", "knn")


def binary_masks_at(mask_logits: Tensor, resolution: int) -> Tensor:
    """Resize mask logits [B, Q, h, w] to [B, Q, R, R] (bilinear) and threshold sigmoid > 0.5."""
    if mask_logits.dim() != 4:
        raise ValueError(f"mask_logits must be [B, Q, h, w], got shape {tuple(mask_logits.shape)}")
    if resolution <= 0:
        raise ValueError(f"RELATION.GRAPH_RESOLUTION must be positive, got {resolution}")
    if tuple(mask_logits.shape[-2:]) != (resolution, resolution):
        mask_logits = F.interpolate(
            mask_logits.float(), size=(resolution, resolution), mode="bilinear", align_corners=False
        )
    return mask_logits > 0  # sigmoid(x) > 0.5  <=>  x > 0


def mask_adjacency(masks: Tensor, distance: int) -> Tensor:
    """Pairwise spatial adjacency of binary masks, batched.

    Args:
        masks: bool [B, Q, R, R].
        distance: masks whose pixels come within this Chebyshev distance are adjacent
            (0: only overlapping masks; 1: also edge/corner-touching masks).
    Returns:
        bool [B, Q, Q], symmetric, diagonal False. A query with an empty mask has no neighbours.
    """
    if distance < 0:
        raise ValueError(f"RELATION.ADJACENCY_DISTANCE must be >= 0, got {distance}")
    B, Q, R1, R2 = masks.shape
    flat = masks.reshape(B * Q, 1, R1, R2).float()
    dilated = F.max_pool2d(flat, kernel_size=2 * distance + 1, stride=1, padding=distance)
    dilated = dilated.reshape(B, Q, R1 * R2)
    # dilated_i overlaps mask_j <=> a pixel of j lies within `distance` of a pixel of i (symmetric)
    overlap = torch.bmm(dilated, flat.reshape(B, Q, R1 * R2).transpose(1, 2))
    adjacency = overlap > 0
    return adjacency & ~_eye(Q, masks.device)


def feature_similarity(features: Tensor) -> Tensor:
    """Cosine similarity matrix [B, Q, Q] of query features [B, Q, C]."""
    normed = F.normalize(features.float(), dim=-1)
    return normed @ normed.transpose(1, 2)


def mask_centroids(masks: Tensor) -> Tuple[Tensor, Tensor]:
    """Centroids of binary masks [B, Q, R, R] in [0, 1] image coordinates.

    Returns:
        centres float [B, Q, 2] as (x, y) of pixel centres, and nonempty bool [B, Q].
    """
    B, Q, H, W = masks.shape
    m = masks.float()
    area = m.sum(dim=(2, 3))
    ys = (torch.arange(H, device=masks.device, dtype=torch.float32) + 0.5) / H
    xs = (torch.arange(W, device=masks.device, dtype=torch.float32) + 0.5) / W
    cx = (m.sum(dim=2) * xs).sum(-1) / area.clamp(min=1)
    cy = (m.sum(dim=3) * ys).sum(-1) / area.clamp(min=1)
    return torch.stack([cx, cy], dim=-1), area > 0


def knn_graph(features: Tensor, masks: Tensor, k: int) -> Tensor:
    """Adaptive graph: symmetrised k nearest neighbours by ``cos(f_i, f_j) - ||c_i - c_j||``.

    Args:
        features: [B, Q, C] query features.
        masks: bool [B, Q, R, R] binary masks (for the centroids).
        k: neighbours picked per query (clamped to Q - 1).
    Returns:
        bool [B, Q, Q], symmetric, diagonal False.
    """
    if k <= 0:
        raise ValueError(f"RELATION.KNN must be positive, got {k}")
    B, Q, _ = features.shape
    eye = _eye(Q, features.device)
    if Q < 2:
        return torch.zeros(B, Q, Q, dtype=torch.bool, device=features.device)
    centres, nonempty = mask_centroids(masks)
    dist = torch.cdist(centres, centres)  # [B, Q, Q]
    both = nonempty[:, :, None] & nonempty[:, None, :]
    dist = torch.where(both, dist, torch.full_like(dist, 2.0**0.5))
    score = feature_similarity(features) - dist
    score = score.masked_fill(eye, float("-inf"))
    idx = score.topk(min(k, Q - 1), dim=-1).indices  # [B, Q, k]
    picked = torch.zeros(B, Q, Q, dtype=torch.bool, device=features.device)
    picked.scatter_(2, idx, True)
    return (picked | picked.transpose(1, 2)) & ~eye


@torch.no_grad()
def build_spatial_semantic_graph(
    mask_logits: Tensor,
    query_features: Tensor,
    *,
    mode: str,
    eta: float,
    adjacency_distance: int,
    resolution: int,
    knn: int,
) -> Tensor:
    """The spatial-semantic graph G of SPADE's RGT.

    Args:
        mask_logits: [B, Q, h, w] predicted mask logits.
        query_features: [B, Q, C] query embeddings (for the cosine term).
        mode: "fixed" (mask adjacency OR cosine > eta) or "knn" (see module docstring).
        eta: cosine threshold of the fixed graph (RELATION.ETA, where its default lives).
        adjacency_distance: pixels (at ``resolution``) within which masks are adjacent.
        resolution: side of the downsampled masks.
        knn: k of the adaptive graph.
    Returns:
        bool [B, Q, Q], symmetric, diagonal False.
    """
    if mode not in GRAPH_MODES:
        raise ValueError(f"RELATION.GRAPH_MODE must be one of {GRAPH_MODES}, got {mode!r}")
    if mask_logits.shape[:2] != query_features.shape[:2]:
        raise ValueError(
            f"mask_logits {tuple(mask_logits.shape)} and query_features "
            f"{tuple(query_features.shape)} disagree on [B, Q]"
        )
    masks = binary_masks_at(mask_logits, resolution)
    if mode == "knn":
        return knn_graph(query_features, masks, knn)
    Q = query_features.shape[1]
    similar = (feature_similarity(query_features) > eta) & ~_eye(Q, query_features.device)
    return mask_adjacency(masks, adjacency_distance) | similar


def _eye(n: int, device: torch.device) -> Tensor:
    return torch.eye(n, dtype=torch.bool, device=device)
