"""Cross-attention capture, token spans and role-map aggregation."""

import pytest
import torch
from calibration_helpers import make_tiny_unet
from open_clip.tokenizer import SimpleTokenizer

from spade.calibration.attention import (
    AttentionStore,
    capture_cross_attention,
    cross_attention_layer_names,
    normalize_maps,
    role_maps,
    role_token_spans,
)


@torch.no_grad()
def test_capture_once_per_layer_per_call_and_restore():
    unet = make_tiny_unet()
    before = dict(unet.attn_processors)
    names = cross_attention_layer_names(unet)
    assert len(names) == 4 and all("attn2" in n for n in names)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    t = torch.tensor([10, 10])
    ref = unet(x, t, encoder_hidden_states=ctx).sample
    store = AttentionStore(4, (8, 8))
    with capture_cross_attention(unet, store):
        during = dict(unet.attn_processors)
        for n, p in during.items():  # attn1 untouched, attn2 replaced
            assert (p is before[n]) == ("attn1" in n)
        out1 = unet(x, t, encoder_hidden_states=ctx).sample
        unet(x, t, encoder_hidden_states=ctx)
    assert store.calls == {n: 2 for n in names}
    assert store.num_maps == 8
    assert torch.allclose(out1, ref, atol=1e-5)  # capturing changes nothing
    maps = store.mean()
    assert maps.shape == (2, 6, 4, 4)
    assert torch.allclose(maps.sum(dim=1), torch.ones(2, 4, 4), atol=1e-5)  # softmax over tokens
    after = dict(unet.attn_processors)
    assert all(after[n] is before[n] for n in before)  # nothing left installed


def test_capture_keeps_gradients():
    unet = make_tiny_unet()
    ctx = torch.randn(1, 3, 8, requires_grad=True)
    store = AttentionStore(4, (8, 8))
    with capture_cross_attention(unet, store):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([5]), encoder_hidden_states=ctx)
    store.mean()[0, 1].sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


def test_store_bad_shapes():
    store = AttentionStore(4, (8, 8))
    with pytest.raises(ValueError, match="attention queries"):
        store.record("x", torch.rand(2, 7, 3), batch=1)
    with pytest.raises(RuntimeError, match="no cross-attention"):
        AttentionStore(4, (8, 8)).mean()
    store.active = False
    store.record("x", torch.rand(2, 16, 3), batch=1)
    assert store.num_maps == 0


def test_token_spans_multi_token_names():
    tok = SimpleTokenizer()
    names = {"subject": "traffic light", "predicate": "is parked on", "object": "traffic light"}
    spans = role_token_spans(tok.encode, "a {subject} {predicate} the {object}", names)
    ids = tok.encode("a traffic light is parked on the traffic light")
    # position 0 = start token; "a" = 1, "traffic light" = 2..3, "is parked on" = 4..6,
    # "the" = 7, the second "traffic light" = 8..9 (not the first occurrence)
    assert spans == {"subject": [2, 3], "predicate": [4, 5, 6], "object": [8, 9]}
    assert [ids[i - 1] for i in spans["object"]] == tok.encode("traffic light")
    shifted = role_token_spans(tok.encode, "{subject} {predicate} {object}", names, offset=9)
    assert shifted["subject"] == [9, 10] and shifted["object"] == [14, 15]
    with pytest.raises(ValueError, match="lacks"):
        role_token_spans(tok.encode, "{subject} near {object}", names)
    with pytest.raises(ValueError, match="too long"):
        role_token_spans(tok.encode, "{subject} {predicate} {object}", names, max_length=6)


def test_role_maps_and_normalisation_hand_values():
    maps = torch.zeros(1, 6, 2, 2)
    maps[0, 1] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    maps[0, 2] = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    maps[0, 4] = torch.tensor([[2.0, 2.0], [0.0, 0.0]])
    out = role_maps(maps, [{"subject": [1, 2], "predicate": [3], "object": [4]}])
    assert torch.allclose(out[0, 0], torch.tensor([[0.5, 0.5], [0.0, 1.5]]))
    assert torch.equal(out[0, 1], torch.zeros(2, 2))
    assert torch.allclose(
        normalize_maps(out, "max")[0, 0], torch.tensor([[1 / 3, 1 / 3], [0, 1.0]])
    )
    assert torch.allclose(normalize_maps(out, "sum")[0, 2], torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    assert torch.equal(normalize_maps(out, "none"), out)
    assert role_maps(maps[:0], []).shape == (0, 3, 2, 2)
    with pytest.raises(ValueError, match="MAP_NORMALIZATION"):
        normalize_maps(out, "softmax")
    with pytest.raises(ValueError, match="span dicts"):
        role_maps(maps, [])
