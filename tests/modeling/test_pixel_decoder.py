"""Pixel decoder: deformable attention against a naive bilinear reference, encoder geometry,
shapes."""

import math

import pytest
import torch
from detectron2.layers import ShapeSpec

from spade.modeling.pixel_decoder import (
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    ms_deform_attn_sample,
)
from spade.modeling.pixel_decoder.encoder import flatten_levels, reference_points


def naive_bilinear(img, x, y):
    """Value of img [C, h, w] at normalised (x, y) (pixel centres at (i + 0.5) / w), 0 outside."""
    _, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(img.shape[0], dtype=img.dtype)
    for xi, yi in [(x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)]:
        wgt = (1 - abs(px - xi)) * (1 - abs(py - yi))
        if 0 <= xi < w and 0 <= yi < h:
            out += wgt * img[:, yi, xi]
    return out


def naive_ms_deform_attn(value, shapes, locations, weights):
    """Explicit loop over batch, query, head, level and point."""
    bsz, _, nheads, head_dim = value.shape
    _, nq, _, nlev, npts, _ = locations.shape
    starts = [0]
    for h, w in shapes.tolist():
        starts.append(starts[-1] + h * w)
    out = torch.zeros(bsz, nq, nheads, head_dim, dtype=value.dtype)
    for b in range(bsz):
        for q in range(nq):
            for m in range(nheads):
                for lv, (h, w) in enumerate(shapes.tolist()):
                    img = value[b, starts[lv] : starts[lv + 1], m].T.reshape(head_dim, h, w)
                    for p in range(npts):
                        x, y = locations[b, q, m, lv, p].tolist()
                        out[b, q, m] += weights[b, q, m, lv, p] * naive_bilinear(img, x, y)
    return out.flatten(2)


def test_deformable_attention_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[3, 4], [2, 2]])
    value = torch.randn(2, 16, 2, 3, generator=g, dtype=torch.float64)
    locations = torch.rand(2, 3, 2, 2, 4, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(2, 3, 2, 2, 4, generator=g, dtype=torch.float64)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    fast = ms_deform_attn_sample(value, shapes, locations, weights)
    slow = naive_ms_deform_attn(value, shapes, locations, weights)
    assert fast.shape == (2, 3, 6)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)


def test_sampling_at_pixel_centre_reads_that_pixel():
    value = torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1)  # one level 2 x 3, values 0..5
    shapes = torch.tensor([[2, 3]])
    loc = torch.tensor([[(2 + 0.5) / 3, (1 + 0.5) / 2]]).view(
        1, 1, 1, 1, 1, 2
    )  # pixel (row 1, col 2)
    out = ms_deform_attn_sample(value, shapes, loc, torch.ones(1, 1, 1, 1, 1))
    assert out.item() == pytest.approx(5.0)
    loc_mid = torch.tensor([[0.5, 0.5]]).view(1, 1, 1, 1, 1, 2)  # between (0,1),(1,1): (1 + 4) / 2
    assert ms_deform_attn_sample(
        value, shapes, loc_mid, torch.ones(1, 1, 1, 1, 1)
    ).item() == pytest.approx(2.5)


def test_module_with_zero_offsets_projects_the_reference_value():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=3)
    torch.nn.init.zeros_(attn.sampling_offsets.bias)
    maps = [torch.randn(1, 8, 2, 3)]
    src, shapes, starts = flatten_levels(maps)
    ref = reference_points(shapes, 1, src.dtype)
    out = attn(src, ref, src, shapes)
    expected = attn.output_proj(attn.value_proj(src))  # every point reads its own pixel
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert starts.tolist() == [0]


def test_reference_points_are_pixel_centres():
    ref = reference_points(torch.tensor([[2, 2], [1, 1]]), 1, torch.float32)
    assert ref.shape == (1, 5, 2, 2)
    expected = [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75], [0.5, 0.5]]
    torch.testing.assert_close(ref[0, :, 0], torch.tensor(expected))
    torch.testing.assert_close(ref[0, :, 1], torch.tensor(expected))


def test_module_rejects_mismatched_shapes():
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1)
    with pytest.raises(ValueError, match="spatial_shapes"):
        attn(
            torch.randn(1, 2, 8),
            torch.rand(1, 2, 1, 2),
            torch.randn(1, 5, 8),
            torch.tensor([[2, 3]]),
        )
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=4)


SHAPES = {
    "res2": ShapeSpec(channels=8, stride=4),
    "res3": ShapeSpec(channels=16, stride=8),
    "res4": ShapeSpec(channels=16, stride=16),
    "res5": ShapeSpec(channels=32, stride=32),
}


def _decoder(common_stride=4, deformable=("res3", "res4", "res5")):
    return MSDeformAttnPixelDecoder(
        input_shape=SHAPES,
        deformable_in_features=list(deformable),
        conv_dim=32,
        mask_dim=16,
        norm="GN",
        common_stride=common_stride,
        encoder_layers=1,
        nheads=4,
        npoints=2,
        dim_feedforward=32,
        dropout=0.0,
    )


@pytest.mark.parametrize("stride", [4, 8])
def test_pixel_decoder_shapes(stride):
    torch.manual_seed(0)
    decoder = _decoder(stride)
    feats = {
        k: torch.randn(2, v.channels, 64 // v.stride, 96 // v.stride) for k, v in SHAPES.items()
    }
    mask_features, multi_scale = decoder.forward_features(feats)
    assert mask_features.shape == (2, 16, 64 // stride, 96 // stride)
    assert [tuple(m.shape) for m in multi_scale] == [(2, 32, 2, 3), (2, 32, 4, 6), (2, 32, 8, 12)]
    assert decoder.fpn_in_features == (["res2"] if stride == 4 else [])


def test_pixel_decoder_rejects_bad_config():
    with pytest.raises(ValueError, match="common_stride"):
        _decoder(common_stride=16)
    with pytest.raises(ValueError, match="not among the backbone"):
        _decoder(deformable=("res3", "res4", "res6"))
    with pytest.raises(ValueError, match="at least 3"):
        _decoder(deformable=("res4", "res5"))
