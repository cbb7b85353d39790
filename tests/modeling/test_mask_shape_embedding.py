"""MaskShapeEmbedding: the shape of a query's own mask, at a fixed scale, added before the
classifier (MASK_HEAD.SHAPE_EMBED_SIZE; the model-level test is in test_meta_arch.py)."""

import math

import pytest
import torch

from spade.modeling.meta_arch.query_classifier import MaskShapeEmbedding


def test_shape_features_hand_values():
    embed = MaskShapeEmbedding(hidden_dim=8, size=4)
    logits = torch.full((1, 3, 8, 8), -20.0)
    logits[0, 0, 2:6, 0:8] = 20.0  # a full-width band 4 rows high: box w 1, h 0.5
    logits[0, 1, 0:4, 0:2] = 20.0  # a 2 x 4 block in the corner: box w 0.25, h 0.5
    # query 2: empty -> read over the whole map
    x = embed.shape_features(logits)
    assert x.shape == (1, 3, 4 * 4 + 3)
    # the band, read in its box [0, 8) x [2, 6) at 4 x 4: bins of one row each, two samples per
    # bin (aligned: at rows 1.75 and 2.25 for the first bin), so the edge bins average 0.75 and
    # 1 -> 0.875 -> 0.75 after the [-1, 1] scaling; full width: every column reads the same
    band = torch.tensor([0.75, 1.0, 1.0, 0.75])[:, None].expand(4, 4).reshape(16)
    torch.testing.assert_close(x[0, 0, :16], band, atol=1e-4, rtol=0)
    # the corner block: interior bins read 1, its edge bins inside the image less
    block = x[0, 1, :16].view(4, 4)
    torch.testing.assert_close(block[:3, :3], torch.ones(3, 3), atol=1e-4, rtol=0)
    assert bool((block[3] < 1).all()) and bool((block[:, 3] < 1).all()) and block.min() > 0
    torch.testing.assert_close(x[0, 0, 16:], torch.tensor([1.0, 0.5, math.log(2.0)]))
    torch.testing.assert_close(x[0, 1, 16:], torch.tensor([0.25, 0.5, math.log(0.5)]))
    # the empty mask: whole-map box, all zeros (-> -1)
    torch.testing.assert_close(x[0, 2, :16], -torch.ones(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(x[0, 2, 16:], torch.tensor([1.0, 1.0, 0.0]))


def test_different_shapes_differ_and_scale_does_not():
    embed = MaskShapeEmbedding(hidden_dim=8, size=8)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc_small = ((yy - 8) ** 2 + (xx - 8) ** 2 <= 5**2).float()
    disc_large = ((yy - 16) ** 2 + (xx - 16) ** 2 <= 10**2).float()
    square = ((yy - 16).abs() <= 10) & ((xx - 16).abs() <= 10)
    logits = torch.stack([disc_small, disc_large, square.float()])[None] * 40 - 20
    x = embed.shape_features(logits)[0, :, :64]
    assert (x[0] - x[1]).abs().mean() < 0.15  # the same shape at two scales
    assert (x[1] - x[2]).abs().mean() > 0.2  # a disc is not a square


def test_starts_at_zero_and_does_not_reach_the_masks():
    embed = MaskShapeEmbedding(hidden_dim=8, size=4)
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    out = embed(logits)
    assert out.shape == (2, 5, 8) and torch.count_nonzero(out) == 0
    out.sum().backward()
    assert logits.grad is None
    assert embed.mlp[-1].weight.grad is not None
    with pytest.raises(ValueError, match="size"):
        MaskShapeEmbedding(8, size=1)
