"""Masked-attention decoder: masking really hides the outside, round-robin scales, outputs."""

import pytest
import torch

from spade.modeling.transformer_decoder import (
    CrossAttentionLayer,
    MaskedAttentionDecoder,
    attention_mask_from_logits,
)


def test_attention_mask_from_logits_hand_computed():
    logits = torch.tensor(
        [[[[5.0, -5.0], [-5.0, 5.0]], [[-5.0, -5.0], [-5.0, -5.0]]]]
    )  # [1, 2, 2, 2]
    mask = attention_mask_from_logits(logits, (2, 2), nheads=3)
    assert mask.shape == (3, 2, 4) and mask.dtype == torch.bool
    assert mask[0, 0].tolist() == [False, True, True, False]  # sees only inside its mask
    assert mask[0, 1].tolist() == [False] * 4  # empty mask: allowed everywhere
    assert torch.equal(mask[0], mask[2])  # same mask for every head


def test_query_cannot_see_outside_its_mask():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(d_model=8, nhead=2).eval()
    tgt = torch.randn(1, 2, 8)
    memory, pos = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    # query 0's mask covers memory tokens 0..2 (a 2 x 3 map, top row); query 1's covers all
    logits = torch.full((1, 2, 2, 3), 6.0)
    logits[0, 0, 1] = -6.0
    attn_mask = attention_mask_from_logits(logits, (2, 3), nheads=2)
    out = layer(tgt, memory, attn_mask=attn_mask, pos=pos)
    perturbed, perturbed_pos = memory.clone(), pos.clone()
    perturbed[0, 3:] += 10 * torch.randn(3, 8)
    perturbed_pos[0, 3:] += 10 * torch.randn(3, 8)
    out2 = layer(tgt, perturbed, attn_mask=attn_mask, pos=perturbed_pos)
    torch.testing.assert_close(out[0, 0], out2[0, 0], rtol=1e-6, atol=1e-6)  # blind outside
    assert (out[0, 1] - out2[0, 1]).abs().max() > 1e-2  # the unmasked query does see the change


def _decoder(dec_layers=4, num_queries=5):
    return MaskedAttentionDecoder(
        in_channels=16,
        mask_dim=12,
        hidden_dim=16,
        num_queries=num_queries,
        nheads=4,
        dim_feedforward=32,
        dec_layers=dec_layers,
        pre_norm=False,
        enforce_input_project=False,
    )


def test_decoder_outputs_and_round_robin_scales():
    torch.manual_seed(0)
    decoder = _decoder(dec_layers=4)
    seen = []
    for layer in decoder.cross_attention:
        layer.register_forward_hook(lambda m, args, out: seen.append(args[1].shape[1]))
    scales = [torch.randn(2, 16, 2, 2), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 8, 8)]
    out = decoder(scales, torch.randn(2, 12, 16, 16))
    assert len(out["query_features"]) == 5 and len(out["pred_masks"]) == 5
    assert out["query_features"][-1].shape == (2, 5, 16)
    assert out["pred_masks"][-1].shape == (2, 5, 16, 16)
    assert seen == [4, 16, 64, 4]  # coarsest first, round-robin


def test_decoder_masks_are_query_embedding_dot_mask_features():
    torch.manual_seed(0)
    decoder = _decoder(dec_layers=1, num_queries=3)
    mask_features = torch.randn(1, 12, 4, 4)
    out = decoder(
        [torch.randn(1, 16, 1, 1), torch.randn(1, 16, 2, 2), torch.randn(1, 16, 4, 4)],
        mask_features,
    )
    emb = decoder.mask_embed(out["query_features"][-1])  # [1, 3, 12]
    expected = (emb[0, :, :, None, None] * mask_features[0][None]).sum(1)
    torch.testing.assert_close(out["pred_masks"][-1][0], expected, rtol=1e-5, atol=1e-5)


def test_decoder_rejects_bad_input():
    with pytest.raises(ValueError, match="dec_layers"):
        _decoder(dec_layers=0)
    with pytest.raises(ValueError, match="3 scales"):
        _decoder()([torch.randn(1, 16, 2, 2)], torch.randn(1, 12, 8, 8))
