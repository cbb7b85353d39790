"""Token grounding of the tiny UNet: noun positions, class masks, the token loss by hand, and a
pretraining step that trains with it."""

import json
import math
import os

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from pretrain_helpers import ZeroLatents, tiny_cfg

from spade.data.synthpsg import STUFF_CLASSES, THING_CLASSES
from spade.pretrain import run_pretraining
from spade.pretrain.grounding import (
    NOUN_PHRASES,
    LayerMapStore,
    grounding_loss,
    grounding_pixel_loss,
    grounding_targets,
    noun_spans,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENCODE = SimpleTokenizer().encode


def test_noun_positions_by_hand():
    # a(1) red(2) circle(3) is(4) left(5) of(6) a(7) blue(8) box(9); position 0 is the start token
    assert noun_spans("a red circle is left of a blue box", ENCODE) == [
        ("circle", [3]),
        ("square", [9]),
    ]
    # a(1) five(2) -(3) pointed(4) star(5) .(6) the(7) clear(8) sky(9)
    assert noun_spans("a five-pointed star. the clear sky", ENCODE) == [
        ("star", [2, 3, 4, 5]),
        ("sky", [8, 9]),
    ]
    # the tokenizer lower-cases, and so does the phrase match
    assert noun_spans("A Five-Pointed Star", ENCODE) == [("star", [2, 3, 4, 5])]


def test_a_phrase_does_not_run_across_punctuation():
    # "square block" is a synonym, but "square," ends its clause: only "square" is a noun
    assert noun_spans("a square, block", ENCODE) == [("square", [2])]
    assert noun_spans("", ENCODE) == []
    assert noun_spans("a picture of nothing", ENCODE) == []


def test_nouns_past_the_context_are_left_out():
    caption = " ".join(["a"] * 74 + ["circle", "and", "star"])
    # circle takes position 75 (the last before the end token); star would be at 77
    assert noun_spans(caption, ENCODE) == [("circle", [75])]


def test_noun_phrase_positions_take_the_size_and_colour_words_by_hand():
    # a(1) small(2) red(3) circle(4) is(5) left(6) of(7) a(8) blue(9) box(10)
    caption = "a small red circle is left of a blue box"
    assert noun_spans(caption, ENCODE, with_modifiers=True) == [
        ("circle", [2, 3, 4]),
        ("square", [9, 10]),
    ]
    assert noun_spans(caption, ENCODE) == [("circle", [4]), ("square", [10])]
    # punctuation ends a phrase: "red," does not modify the circle; stuff nouns have none
    assert noun_spans("a red, circle", ENCODE, with_modifiers=True) == [("circle", [4])]
    assert noun_spans("the wall above floor", ENCODE, with_modifiers=True) == [
        ("wall", [2]),
        ("floor", [4]),
    ]
    # a multi-token synonym keeps all its tokens after its modifiers
    assert noun_spans("a large five-pointed star", ENCODE, with_modifiers=True) == [
        ("star", [2, 3, 4, 5, 6])
    ]


def test_every_synonym_maps_to_its_class():
    assert NOUN_PHRASES[("plus", "sign")] == "cross"
    assert NOUN_PHRASES[("lawn",)] == "grass"
    assert NOUN_PHRASES[("six-sided", "shape")] == "hexagon"
    assert set(NOUN_PHRASES.values()) == set(THING_CLASSES) | set(STUFF_CLASSES)


def test_targets_are_class_unions_and_a_missing_class_is_an_error():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, 0, 0] = masks[1, 3, 3] = True  # two circles
    masks[2, 1:3, 1:3] = True  # a star
    names = ["circle", "circle", "star"]
    (pos, m), (pos2, m2) = grounding_targets("circle is left of star", masks, names, ENCODE)
    assert pos == [1] and pos2 == [5]
    assert m.dtype == np.float32 and m[0, 0] == 1 and m[3, 3] == 1 and m.sum() == 2
    assert m2.sum() == 4
    with pytest.raises(ValueError, match="image 7.*'ring'"):
        grounding_targets("a ring", masks, names, ENCODE, where="image 7")
    # pixel_phrase adds the phrase's positions: a(1) red(2) circle(3) ... a(7) star(8)
    caption = "a red circle is left of a star"
    (pos, m, phrase), (pos2, _, phrase2) = grounding_targets(
        caption, masks, names, ENCODE, pixel_phrase=True
    )
    assert (pos, phrase, pos2, phrase2) == ([3], [2, 3], [8], [8])
    assert m.sum() == 2


def test_pixel_loss_reads_the_phrase_and_the_token_loss_the_noun():
    # 3 positions on a 2 x 2 layer: 1 is a colour word, 2 the noun; the segment is the top row
    maps = torch.zeros(1, 4, 2, 2)
    maps[0, 1] = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    maps[0, 2] = torch.tensor([[0.25, 0.25], [0.25, 0.25]])
    mask = np.zeros((2, 2), np.float32)
    mask[0] = 1
    noun_only = [[([2], mask)]]
    phrase = [[([2], mask, [1, 2])]]
    # the noun alone: 0.25 everywhere -> BCE -log(0.25) on the top row, -log(0.75) below
    alone = (2 * -math.log(0.25) + 2 * -math.log(0.75)) / 4
    assert grounding_pixel_loss([maps], noun_only).item() == pytest.approx(alone, rel=1e-5)
    # the phrase: 0.75 on the top row, 0.25 below
    summed = (2 * -math.log(0.75) + 2 * -math.log(0.75)) / 4
    assert grounding_pixel_loss([maps], phrase).item() == pytest.approx(summed, rel=1e-5)
    # the token loss reads the noun in both: inside share 0.5 -> 0.25
    assert grounding_loss([maps], phrase).item() == pytest.approx(0.25)
    assert grounding_loss([maps], noun_only).item() == pytest.approx(0.25)


def test_token_loss_by_hand():
    # one sample, 3 context positions, a 2 x 2 layer; the noun is position 1
    a = torch.tensor([[0.5, 0.1], [0.3, 0.1]])
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 1] = a
    mask = np.zeros((4, 4), np.float32)
    mask[:2, :2] = 1  # the top-left cell of the 2 x 2 grid
    targets = [[([1], mask)]]
    # inside = 0.5 / 1.0 -> (1 - 0.5)^2 = 0.25
    assert grounding_loss([maps], targets).item() == pytest.approx(0.25)
    # a second layer whose noun attends only inside: loss 0; the mean over layers is 0.125
    inside = torch.zeros(1, 3, 2, 2)
    inside[0, 1, 0, 0] = 0.7
    assert grounding_loss([maps, inside], targets).item() == pytest.approx(0.125)
    # a two-token noun sums its positions: 0.5 + 0.2 inside of 1.0 + 0.4 -> (1 - 0.5)^2
    maps[0, 2] = torch.tensor([[0.2, 0.2], [0.0, 0.0]])
    assert grounding_loss([maps], [[([1, 2], mask)]]).item() == pytest.approx(0.25)


def test_pixel_loss_by_hand():
    # one sample, 3 context positions, a 2 x 2 layer; the noun is position 1
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 1] = torch.tensor([[0.5, 0.25], [0.25, 0.1]])
    mask = np.zeros((4, 4), np.float32)
    mask[:2, :2] = 1  # covers the top-left cell
    mask[2, 2] = 1  # and a quarter of the bottom-right cell
    # BCE per cell against the area shares [[1, 0], [0, 0.25]], then the mean over the 4 cells
    cells = [
        -math.log(0.5),
        -math.log(0.75),
        -math.log(0.75),
        -(0.25 * math.log(0.1) + 0.75 * math.log(0.9)),
    ]
    expected = sum(cells) / 4
    assert grounding_pixel_loss([maps], [[([1], mask)]]).item() == pytest.approx(expected, rel=1e-5)
    # a noun that takes all the attention inside and none outside scores (near) 0 on a layer
    exact = torch.zeros(1, 3, 2, 2)
    exact[0, 1, 0, 0] = 1.0
    top_left = np.zeros((2, 2), np.float32)
    top_left[0, 0] = 1
    assert grounding_pixel_loss([exact], [[([1], top_left)]]).item() < 1e-4
    # the mean over layers; no noun gives 0, still attached
    both = grounding_pixel_loss([maps, exact], [[([1], mask)]]).item()
    second = grounding_pixel_loss([exact], [[([1], mask)]]).item()
    assert both == pytest.approx((expected + second) / 2, rel=1e-5)
    free = torch.rand(1, 3, 2, 2, requires_grad=True)
    zero = grounding_pixel_loss([free], [[]])
    assert zero.item() == 0.0 and zero.requires_grad


def test_pixel_loss_moves_the_peak_onto_the_mask():
    # the noun's attention peaks outside its segment (a stuff word on the thing standing on it)
    maps = torch.tensor([[[[0.1, 0.1], [0.3, 0.05]]]]).repeat(1, 2, 1, 1).requires_grad_(True)
    mask = np.zeros((2, 2), np.float32)
    mask[0] = 1  # the segment is the top row
    grounding_pixel_loss([maps], [[([1], mask)]]).backward()
    g = maps.grad[0, 1]
    assert (g[0] < 0).all() and (g[1] > 0).all()  # descent raises inside, lowers outside
    assert (maps.grad[0, 0] == 0).all()


def test_loss_pulls_attention_into_the_mask():
    maps = torch.full((1, 2, 2, 2), 0.25, requires_grad=True)
    mask = np.zeros((2, 2), np.float32)
    mask[0, 0] = 1
    grounding_loss([maps], [[([1], mask)]]).backward()
    g = maps.grad[0, 1]
    assert g[0, 0] < 0 and (g.flatten()[1:] > 0).all()  # descent raises the inside cell
    assert (maps.grad[0, 0] == 0).all()  # other tokens are untouched


def test_no_noun_gives_zero_still_attached():
    maps = torch.rand(2, 3, 2, 2, requires_grad=True)
    loss = grounding_loss([maps], [[], []])
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="at least one"):
        grounding_loss([], [[]])


def test_layer_store_keeps_each_layer_at_its_grid():
    store = LayerMapStore((4, 4))
    probs = torch.rand(2 * 3, 4, 5).softmax(-1)  # batch 2, 3 heads, a 2 x 2 layer, 5 tokens
    store.record("x", probs, batch=2)
    (m,) = store.maps
    assert m.shape == (2, 5, 2, 2)
    expected = probs.reshape(2, 3, 2, 2, 5).mean(1).permute(0, 3, 1, 2)
    assert torch.allclose(m, expected)


def test_unet_pretraining_with_grounding(stage0_root, tmp_path):
    """A UNet step with PRETRAIN.UNET.GROUNDING_WEIGHT and GROUNDING_PIXEL_WEIGHT logs both
    grounding losses, the pixel loss alone still gets its targets, and a negative weight is an
    error naming its key."""
    made = {"clip": stage0_root / "clip" / "open_clip_config.json"}
    made["vae"] = stage0_root / "sd" / "vae" / "config.json"
    for task in ("clip", "vae"):
        if not made[task].exists():  # the frozen models the UNet trains on
            cfg, args = tiny_cfg(
                os.path.join(ROOT, "configs", "pretrain", f"{task}_tiny.yaml"),
                stage0_root,
                task,
                max_iter=2,
            )
            run_pretraining(cfg, args)
    config = os.path.join(ROOT, "configs", "pretrain", "unet_tiny_grounded.yaml")
    extra = [
        "MODEL.WEIGHTS", "",  # from scratch here, not from unet_tiny.yaml's run
        "PRETRAIN.EXPORT_DIR", str(tmp_path / "sd_grounded"),
        "OUTPUT_DIR", str(tmp_path / "out"),
    ]  # fmt: skip
    pixel = ["PRETRAIN.UNET.GROUNDING_PIXEL_WEIGHT", "0.05"]
    cfg, args = tiny_cfg(config, stage0_root, "unet", max_iter=2, extra=extra + pixel)
    assert cfg.PRETRAIN.UNET.GROUNDING_WEIGHT > 0
    run_pretraining(cfg, args)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")]
    ground = [r["loss_ground"] for r in rows if "loss_ground" in r]
    assert ground and all(0 < g <= cfg.PRETRAIN.UNET.GROUNDING_WEIGHT for g in ground)
    # BCE of a probability against a share: positive; below 0.05 x -log(1e-6) by the clamp
    pixels = [r["loss_ground_pixel"] for r in rows if "loss_ground_pixel" in r]
    assert pixels and all(0 < p < 0.05 * 14 for p in pixels)
    # the pixel loss alone (on noun phrases) still asks the batches for grounding targets
    only = ["PRETRAIN.UNET.GROUNDING_WEIGHT", "0.0", "OUTPUT_DIR", str(tmp_path / "pixel_only")]
    only += ["PRETRAIN.UNET.GROUNDING_PIXEL_PHRASE", "True"]
    cfg, args = tiny_cfg(config, stage0_root, "unet", max_iter=2, extra=extra + pixel + only)
    run_pretraining(cfg, args)
    rows = [json.loads(line) for line in open(tmp_path / "pixel_only" / "metrics.json")]
    assert any("loss_ground_pixel" in r for r in rows)
    assert not any("loss_ground" in r for r in rows)
    for key in ("GROUNDING_WEIGHT", "GROUNDING_PIXEL_WEIGHT"):
        bad, bad_args = tiny_cfg(
            config, stage0_root, "unet", extra=extra + [f"PRETRAIN.UNET.{key}", "-1.0"]
        )
        with pytest.raises(ValueError, match=f"PRETRAIN.UNET.{key} must be"):
            run_pretraining(bad, bad_args)


def test_teacher_form_share_draws_stage1_captions(tmp_path):
    """TEACHER_FORM_SHARE 0 keeps the corpus's caption mix bit for bit; 1 gives every kept caption
    in the stage-1 teacher form "[subject] is [predicate] [object]"; outside [0, 1] is an error
    naming the key."""
    from spade.pretrain.corpus import Corpus, CorpusSpec, build_corpus
    from spade.pretrain.unet import unet_batches

    root = str(tmp_path / "corpus")
    build_corpus(root, CorpusSpec(seed=0, num_images=16, image_size=64, shard_size=16))
    corpus = Corpus(root)

    def first(share, steps=3):
        gen = unet_batches(corpus, ZeroLatents(), 8, 0.25, seed=3, teacher_form_share=share)
        return [next(gen)["captions"] for _ in range(steps)]

    # share 0: the draw of earlier runs, one dropout draw per sample then the corpus's own caption
    stream = corpus.iter_indices(3, 0, 1)
    expected = []
    for step in range(3):
        rng = np.random.default_rng([3, step, 13])
        picks = [next(stream) for _ in range(8)]
        expected.append(["" if rng.random() < 0.25 else corpus.caption(i, e) for i, e in picks])
    assert first(0.0) == expected
    kept = [c for batch in expected for c in batch if c]
    assert any("," in c or " and " in c for c in kept)  # the corpus's scene captions are there

    teacher = [c for batch in first(1.0) for c in batch]
    assert 0 < sum(c == "" for c in teacher) < len(teacher)  # dropout for guidance still applies
    names = set(THING_CLASSES) | set(STUFF_CLASSES)
    stream = corpus.iter_indices(3, 0, 1)
    images = [next(stream)[0] for _ in range(len(teacher))]
    in_form = 0
    for c, i in zip(teacher, images):
        if not c:
            continue
        if not corpus.scene(i).candidates:  # no true relation to name: the scene caption
            assert c in [corpus.caption(i, e, kind="scene") for e in range(4)], c
            continue
        subject, rest = c.split(" is ", 1)
        assert subject in names and rest.split()[-1] in names, c
        assert "," not in c and "." not in c and c.count(" is ") == 1, c  # bare names, no clauses
        in_form += 1
    assert in_form >= 10
    with pytest.raises(ValueError, match="PRETRAIN.UNET.TEACHER_FORM_SHARE"):
        first(1.5, steps=1)


def test_batches_carry_phrase_positions_with_pixel_phrase(tmp_path):
    """PRETRAIN.UNET.GROUNDING_PIXEL_PHRASE: every target of a batch has its noun phrase's
    positions, which end with the noun's own and start at most two words (size, colour) before."""
    from spade.pretrain.corpus import Corpus, CorpusSpec, build_corpus
    from spade.pretrain.unet import unet_batches

    root = str(tmp_path / "corpus")
    build_corpus(root, CorpusSpec(seed=0, num_images=16, image_size=64, shard_size=16))
    corpus = Corpus(root)
    plain = next(unet_batches(corpus, ZeroLatents(), 16, 0.0, seed=1, encode=ENCODE))
    phrase = next(
        unet_batches(corpus, ZeroLatents(), 16, 0.0, seed=1, encode=ENCODE, pixel_phrase=True)
    )
    assert plain["captions"] == phrase["captions"]
    longer = 0
    for items, items_p in zip(plain["grounding"], phrase["grounding"]):
        assert len(items) == len(items_p)
        for (pos, mask), (pos_p, mask_p, span) in zip(items, items_p):
            assert pos_p == pos and np.array_equal(mask, mask_p)
            assert span[-len(pos) :] == pos and len(span) - len(pos) <= 2
            assert span == list(range(span[0], span[-1] + 1))
            longer += len(span) > len(pos)
    assert longer > 0  # the corpus names things with their colour
