"""RGT_g attention masks really restrict P+ / P-, and RGT_l equals the GCN formula."""

import math

import pytest
import torch

from spade.modeling.relation.rgt import (
    GraphConvolution,
    MaskedMultiheadAttention,
    RGTGlobalLayer,
    RGTLocal,
    normalized_adjacency,
)

# 0 - 1 neighbours, 2 and 3 isolated from 0 and 1 (2 - 3 neighbours)
GRAPH = torch.tensor([[[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]], dtype=torch.bool)


def _x(seed=0, dim=8):
    return torch.randn(1, 4, dim, generator=torch.Generator().manual_seed(seed))


def test_row_without_allowed_keys_is_zero_not_nan():
    torch.manual_seed(0)
    attn = MaskedMultiheadAttention(8, 2)
    allowed = torch.zeros(1, 4, 4, dtype=torch.bool)
    allowed[0, 0, 1] = True
    x = _x().requires_grad_(True)
    out = attn(x, allowed)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 1:], torch.zeros(3, 8))
    assert out[0, 0].abs().sum() > 0
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_non_neighbour_cannot_influence_neighbour_branch():
    torch.manual_seed(0)
    layer = RGTGlobalLayer(8, 2, 16)
    x = _x()
    perturbed = x.clone()
    perturbed[0, 2] += 5.0  # node 2 is a non-neighbour of node 0
    eye = torch.eye(4, dtype=torch.bool)[None]
    plus = layer.neighbour_attention(x, GRAPH)[0, 0]
    plus_perturbed = layer.neighbour_attention(perturbed, GRAPH)[0, 0]
    assert torch.allclose(plus, plus_perturbed, atol=1e-6)
    minus = layer.non_neighbour_attention(x, ~GRAPH & ~eye)[0, 0]
    minus_perturbed = layer.non_neighbour_attention(perturbed, ~GRAPH & ~eye)[0, 0]
    assert (minus - minus_perturbed).abs().max() > 1e-3
    # gradient view: d P+(q)_0 / d q_2 is exactly zero, d P+(q)_0 / d q_1 is not
    x.requires_grad_(True)
    layer.neighbour_attention(x, GRAPH)[0, 0].sum().backward()
    assert torch.equal(x.grad[0, 2], torch.zeros(8)) and torch.equal(x.grad[0, 3], torch.zeros(8))
    assert x.grad[0, 1].abs().sum() > 0


def test_layer_with_only_neighbour_attention_is_local_to_the_graph():
    torch.manual_seed(0)
    layer = RGTGlobalLayer(8, 2, 16, use_non_neighbour_attention=False)
    assert layer.non_neighbour_attention is None
    x = _x()
    perturbed = x.clone()
    perturbed[0, 3] -= 3.0
    out, out_p = layer(x, GRAPH), layer(perturbed, GRAPH)
    assert torch.allclose(out[0, :2], out_p[0, :2], atol=1e-6)  # 0 and 1 do not see node 3
    assert (out[0, 2] - out_p[0, 2]).abs().max() > 1e-3  # node 2 does
    full = RGTGlobalLayer(8, 2, 16)
    assert (full(x, GRAPH)[0, 0] - full(perturbed, GRAPH)[0, 0]).abs().max() > 1e-3


def test_normalized_adjacency_and_gcn_equal_formula_on_path_graph():
    # path 0 - 1 - 2: G + I = [[1,1,0],[1,1,1],[0,1,1]], degrees (2, 3, 2)
    g = torch.tensor([[[0, 1, 0], [1, 0, 1], [0, 1, 0]]], dtype=torch.bool)
    r6 = 1 / math.sqrt(6)
    expected = torch.tensor([[0.5, r6, 0.0], [r6, 1 / 3, r6], [0.0, r6, 0.5]])
    a = normalized_adjacency(g)
    assert torch.allclose(a[0], expected, atol=1e-6)
    gcn = GraphConvolution(1, 1)
    with torch.no_grad():
        gcn.weight.fill_(2.0)
    q = torch.tensor([[[1.0], [2.0], [3.0]]])  # q W = (2, 4, 6)
    out = gcn(q, a)[0, :, 0]
    s6 = math.sqrt(6)
    assert torch.allclose(out, torch.tensor([1 + 4 / s6, 8 / s6 + 4 / 3, 4 / s6 + 3]), atol=1e-5)


def test_gcn_on_empty_graph_is_per_node_and_local_module_runs():
    a = normalized_adjacency(torch.zeros(1, 3, 3, dtype=torch.bool))
    assert torch.equal(a[0], torch.eye(3))
    torch.manual_seed(0)
    local = RGTLocal(8, 2)
    out = local(_x(), GRAPH)
    assert out.shape == (1, 4, 8) and torch.isfinite(out).all()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="NHEADS"):
        MaskedMultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="attention mask"):
        MaskedMultiheadAttention(8, 2)(_x(), torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="GCN_LAYERS"):
        RGTLocal(8, 0)
