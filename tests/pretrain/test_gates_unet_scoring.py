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


def test_pointing_game_counts_hits_per_role_kind_and_class():
    """A stub teacher puts each subject map's peak on its subject and every object map's peak
    on the circle: circle -> square and square -> sky score subject hits 2 / 2 and object hits
    0 / 1 for things (square) and 0 / 1 for stuff (sky), with per-class tallies to match."""
    from spade.pretrain.gates import CLASS_NAMES, ValImage
    from spade.pretrain.gates_unet import pointing_game

    circle, square, sky = (CLASS_NAMES.index(n) for n in ("circle", "square", "sky"))
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 0:4, 0:4] = True  # circle: map cell (0, 0) of a 4 x 4 map
    masks[1, 12:16, 12:16] = True  # square: cell (3, 3)
    masks[2] = ~(masks[0] | masks[1])  # sky: the rest
    image = ValImage(
        image_id="0",
        rgb=np.zeros((16, 16, 3), dtype=np.uint8),
        masks=masks,
        categories=[circle, square, sky],
        colours=["red", "blue"],
        relations=[[0, 1, 0], [1, 2, 0]],  # circle -> square, square -> sky
        boxes=[[0, 0, 4, 4], [12, 12, 16, 16], [0, 0, 16, 16]],
    )
    peak = {"circle": (0, 0), "square": (3, 3), "sky": (0, 3)}
    seen = []

    def teacher(img, triplets):
        seen.append((tuple(img.shape), list(triplets)))
        maps = torch.full((len(triplets), 3, 4, 4), 0.1)
        for t, (subject, _, _) in enumerate(triplets):
            maps[t, 0][peak[subject]] = 1.0
            maps[t, 2][peak["circle"]] = 1.0
        return maps

    out = pointing_game(teacher, [image], image_size=16, max_triplets=4, limit=10)
    assert seen[0][0] == (3, 16, 16)
    assert [t[0] for t in seen[0][1]] == ["circle", "square"]
    assert out["triplets"] == 2
    assert out["pointing_subject_things"] == 1.0 and out["count_subject_things"] == 2
    assert out["pointing_object_things"] == 0.0 and out["count_object_things"] == 1
    assert out["pointing_object_stuff"] == 0.0 and out["count_object_stuff"] == 1
    assert out["pointing_subject_stuff"] is None and out["count_subject_stuff"] == 0
    assert out["pointing_by_class"] == {
        "subject": {"circle": [1, 1], "square": [1, 1]},
        "object": {"sky": [0, 1], "square": [0, 1]},
    }
    # subject circle: mass 1 + 15 x 0.1 = 2.5 in all, 1 of it on 1 / 16 of the image -> 6.4x
    # subject square likewise; the mean is 6.4
    assert out["mass_ratio_subject_things"] == pytest.approx(6.4, abs=1e-3)
    assert pointing_game(teacher, [image], 16, 4, 1)["triplets"] == 1  # the limit counts triplets
    # the summary of the first triplet only (circle -> square) sits beside the full one
    first = pointing_game(teacher, [image], 16, 4, 10, first=1)
    assert {k: v for k, v in first.items() if k != "first_1"} == out
    assert first["first_1"]["triplets"] == 1
    assert (
        first["first_1"]["count_subject_things"] == 1
        and first["first_1"]["count_object_stuff"] == 0
    )
    assert first["first_1"]["pointing_object_things"] == 0.0
    assert first["first_1"]["mass_ratio_subject_things"] == pytest.approx(6.4, abs=1e-3)
    assert first["first_1"]["pointing_by_class"] == {
        "subject": {"circle": [1, 1]},
        "object": {"square": [0, 1]},
    }
    assert pointing_game(teacher, [image], 16, 4, 10, first=5)["first_5"]["triplets"] == 2
