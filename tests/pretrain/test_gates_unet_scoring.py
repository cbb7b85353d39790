"""Scoring of the UNet gates' maps (pointing game and word maps), on hand-made maps and masks."""

import numpy as np
import pytest
import torch

from spade.pretrain.gates_unet import _word_span, hit_and_mass_ratio


def _mask(h, w, rows, cols):
    m = np.zeros((h, w), dtype=bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


def test_peaked_map_inside_the_segment():
    # 4 x 4 map, all mass on cell (1, 2); the 8 x 8 segment is exactly that cell's 2 x 2 pixels.
    m = torch.zeros(4, 4)
    m[1, 2] = 1.0
    hit, ratio = hit_and_mass_ratio(m, _mask(8, 8, (2, 4), (4, 6)))
    assert hit is True
    assert ratio == pytest.approx(16.0)  # mass 1 on an area share of 4 / 64


def test_uniform_map_has_ratio_one_and_argmax_at_the_first_cell():
    seg = _mask(8, 8, (0, 4), (0, 8))  # the top half
    hit, ratio = hit_and_mass_ratio(torch.ones(4, 4), seg)
    assert ratio == pytest.approx(1.0)
    assert hit is True  # argmax of a constant map is cell (0, 0): pixel (1, 1), inside
    hit, _ = hit_and_mass_ratio(torch.ones(4, 4), ~seg)
    assert hit is False


def test_half_mass_on_a_quarter_and_a_miss():
    # Cells (0, 0) and (3, 3) carry 0.6 and 0.4; the segment is the top-left quarter (2 x 2 cells).
    m = torch.zeros(4, 4)
    m[0, 0], m[3, 3] = 0.6, 0.4
    seg = _mask(16, 16, (0, 8), (0, 8))
    hit, ratio = hit_and_mass_ratio(m, seg)
    assert hit is True and ratio == pytest.approx(0.6 / 0.25)
    hit, ratio = hit_and_mass_ratio(m, _mask(16, 16, (8, 16), (8, 16)))
    assert hit is False and ratio == pytest.approx(0.4 / 0.25)


def test_empty_segment_does_not_divide_by_zero():
    hit, ratio = hit_and_mass_ratio(torch.ones(4, 4), np.zeros((8, 8), dtype=bool))
    assert hit is False and ratio == 0.0


def test_word_spans_with_a_made_up_tokenizer():
    vocab = {"a": [5], "red": [7], "plus": [8], "sign": [9]}

    def encode(text):
        return [i for w in text.split() for i in vocab[w]]

    assert _word_span(encode, "a", "red") == [2]  # position 0 is the start token
    assert _word_span(encode, "a red", "plus sign") == [3, 4]
    assert _word_span(encode, "", "red") == [1]


def test_negative_word_map_images_is_an_error_naming_the_key():
    from detectron2.config import get_cfg

    from spade.pretrain import add_pretrain_config
    from spade.pretrain.gates_unet import unet_gates

    cfg = get_cfg()
    add_pretrain_config(cfg)
    cfg.PRETRAIN.GATES.WORD_MAP_IMAGES = -1
    with pytest.raises(ValueError, match="PRETRAIN.GATES.WORD_MAP_IMAGES"):
        unet_gates(cfg, "no/such/folder", [])
