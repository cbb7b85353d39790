"""Spatial-semantic graph G on hand-made masks and features."""

import pytest
import torch

from spade.modeling.relation.graph import (
    binary_masks_at,
    build_spatial_semantic_graph,
    knn_graph,
    mask_adjacency,
    mask_centroids,
)


def _box_logits(boxes, size=32):
    """Mask logits [1, Q, size, size]: +10 inside each (x0, y0, x1, y1) box (end exclusive), else
    -10."""
    logits = torch.full((1, len(boxes), size, size), -10.0)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        logits[0, i, y0:y1, x0:x1] = 10.0
    return logits


# A and B share an edge; C sits in the far corner (Chebyshev gap to A: 24 - 7 = 17 rows, to B: 17)
TOUCHING_AND_DISTANT = [(0, 0, 8, 8), (8, 0, 16, 8), (24, 24, 32, 32)]
ORTHOGONAL = torch.eye(3)[None]  # [1, 3, 3] cosine 0 between all queries


# Every graph argument is required (RELATION.* holds the defaults); the tests pass them all.
GRAPH = dict(mode="fixed", eta=0.65, adjacency_distance=1, resolution=32, knn=1)


def _graph(logits, feats, **kw):
    return build_spatial_semantic_graph(logits, feats, **{**GRAPH, **kw})[0].int().tolist()


def test_touching_masks_are_neighbours_and_distant_ones_are_not():
    g = _graph(_box_logits(TOUCHING_AND_DISTANT), ORTHOGONAL)
    assert g == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]


def test_adjacency_distance_is_chebyshev_gap():
    logits = _box_logits(TOUCHING_AND_DISTANT)
    # distance 0: only overlapping masks; A and B only touch
    assert _graph(logits, ORTHOGONAL, adjacency_distance=0) == [[0] * 3] * 3
    # the gap between B and C is 17 rows (rows 7 -> 24) -> adjacent from distance 17 on
    assert _graph(logits, ORTHOGONAL, adjacency_distance=16)[1][2] == 0
    assert _graph(logits, ORTHOGONAL, adjacency_distance=17) == [[0, 1, 1], [1, 0, 1], [1, 1, 0]]


def test_similar_features_link_distant_masks_above_eta():
    logits = _box_logits(TOUCHING_AND_DISTANT)
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]])  # cos(A, C) = 0.8, cos(B, C) = 0.6
    assert _graph(logits, feats) == [[0, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert _graph(logits, feats, eta=0.85) == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]


def test_masks_are_downsampled_to_graph_resolution():
    # at 64 x 64 the boxes are twice as large; at resolution 32 the result must be the same
    big = [(2 * a, 2 * b, 2 * c, 2 * d) for a, b, c, d in TOUCHING_AND_DISTANT]
    logits = _box_logits(big, size=64)
    assert binary_masks_at(logits, 32).shape == (1, 3, 32, 32)
    assert torch.equal(
        binary_masks_at(logits, 32), binary_masks_at(_box_logits(TOUCHING_AND_DISTANT), 32)
    )
    assert _graph(logits, ORTHOGONAL) == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]


def test_empty_mask_has_no_spatial_neighbours():
    logits = _box_logits([(0, 0, 8, 8), (0, 0, 0, 0)])
    assert mask_adjacency(binary_masks_at(logits, 32), 3)[0].int().tolist() == [[0, 0], [0, 0]]


def test_knn_uses_features_and_centroids():
    # identical features: the centroid distance decides; 0 ~ 1 (top-left), 2 ~ 3 (bottom-right)
    logits = _box_logits([(0, 0, 4, 4), (4, 0, 8, 4), (28, 28, 32, 32), (24, 28, 28, 32)])
    feats = torch.ones(1, 4, 3)
    g = _graph(logits, feats, mode="knn", knn=1)
    assert g == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    # empty masks (all equally far): the features decide
    empty = torch.full((1, 4, 32, 32), -10.0)
    feats = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    assert _graph(empty, feats, mode="knn", knn=1) == g


def test_centroids_hand_values():
    masks = binary_masks_at(_box_logits([(0, 0, 8, 8), (0, 0, 0, 0)]), 32)
    centres, nonempty = mask_centroids(masks)
    assert torch.allclose(centres[0, 0], torch.tensor([4.0 / 32, 4.0 / 32]))
    assert nonempty[0].tolist() == [True, False]


def test_random_batch_graph_is_symmetric_without_self_loops():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 20, 20, generator=gen) * 3
    feats = torch.randn(2, 6, 8, generator=gen)
    for mode in ("fixed", "knn"):
        g = build_spatial_semantic_graph(
            logits, feats, **{**GRAPH, "mode": mode, "resolution": 16, "knn": 2}
        )
        assert g.dtype == torch.bool and g.shape == (2, 6, 6)
        assert torch.equal(g, g.transpose(1, 2))
        assert not g.diagonal(dim1=1, dim2=2).any()
    assert knn_graph(feats[:, :1], binary_masks_at(logits[:, :1], 16), 3).shape == (2, 1, 1)


def test_bad_inputs_raise():
    logits = _box_logits(TOUCHING_AND_DISTANT)
    with pytest.raises(ValueError, match="GRAPH_MODE"):
        build_spatial_semantic_graph(logits, ORTHOGONAL, **{**GRAPH, "mode": "radius"})
    with pytest.raises(ValueError, match="disagree"):
        build_spatial_semantic_graph(logits, torch.eye(4)[None], **GRAPH)
    with pytest.raises(ValueError, match="ADJACENCY_DISTANCE"):
        build_spatial_semantic_graph(logits, ORTHOGONAL, **{**GRAPH, "adjacency_distance": -1})
    with pytest.raises(ValueError, match="KNN"):
        build_spatial_semantic_graph(logits, ORTHOGONAL, **{**GRAPH, "mode": "knn", "knn": 0})
    with pytest.raises(ValueError, match="mask_logits"):
        binary_masks_at(logits[0], 32)
