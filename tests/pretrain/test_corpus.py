"""The caption corpus: determinism, coverage of the vocabulary, disjointness, resumable build."""

import os

import numpy as np
import pytest

from spade.data.synthpsg import (
    PALETTE,
    PREDICATE_CLASSES,
    STUFF_CLASSES,
    THING_CLASSES,
    generate_image,
    render_scene,
)
from spade.pretrain.captions import PREDICATE_SYNONYMS, SHAPE_SYNONYMS, scene_caption, size_word
from spade.pretrain.corpus import (
    CORPUS_SEED_OFFSET,
    Corpus,
    CorpusSpec,
    SceneText,
    build_corpus,
    check_disjoint,
)


def test_render_scene_keeps_the_dataset_bytes():
    rgb, pan, rec = generate_image(3, 7)
    scene = render_scene(3, 7)
    assert np.array_equal(scene.rgb, rgb) and np.array_equal(scene.panoptic, pan)
    assert scene.record == rec
    assert len(scene.thing_colours) == len(scene.thing_classes) == len(scene.thing_radii)
    assert all(c in PALETTE for c in scene.thing_colours)


def test_size_word_thresholds():
    assert size_word(0.10 * 128, 128) == "small"
    assert size_word(0.13 * 128, 128) == ""
    assert size_word(0.16 * 128, 128) == "large"


def test_scene_caption_names_every_thing_with_its_colour():
    scene = SceneText.from_scene(render_scene(CORPUS_SEED_OFFSET, 4, num_things=(3, 3)))
    text = scene_caption(scene, np.random.default_rng(0), kind="scene", synonym_prob=0.0)
    for cls, colour in zip(scene.thing_classes, scene.thing_colours):
        assert f"{colour} {THING_CLASSES[cls]}" in text
    for stuff in scene.stuff_names:
        assert stuff in text


def test_bare_caption_is_the_teacher_form():
    scene = SceneText.from_scene(render_scene(CORPUS_SEED_OFFSET, 2, num_things=(4, 4)))
    text = scene_caption(scene, np.random.default_rng(1), kind="bare", synonym_prob=0.0)
    words = text.split(" is ")
    assert len(words) == 2 and words[0] in THING_CLASSES
    assert any(words[1].startswith(p + " ") for p in PREDICATE_CLASSES)


def test_unknown_kind_and_single_on_many_things_are_errors():
    scene = SceneText.from_scene(render_scene(CORPUS_SEED_OFFSET, 2, num_things=(4, 4)))
    with pytest.raises(ValueError, match="unknown caption kind"):
        scene_caption(scene, np.random.default_rng(0), kind="poem")
    with pytest.raises(ValueError, match="one-thing scene"):
        scene_caption(scene, np.random.default_rng(0), kind="single")


def test_corpus_is_deterministic_covers_the_vocabulary_and_resumes(tmp_path):
    spec = CorpusSpec(seed=0, num_images=240, shard_size=100)
    root = str(tmp_path / "corpus")
    build_corpus(root, spec)
    again = str(tmp_path / "again")
    os.makedirs(again)
    # an interrupted build: one shard present, the manifest missing -> the rest is filled in
    build_corpus(again, CorpusSpec(seed=0, num_images=100, shard_size=100))
    os.remove(os.path.join(again, "manifest.json"))
    build_corpus(again, spec)
    a, b = Corpus(root), Corpus(again)
    assert len(a) == 240
    for i in (0, 150, 239):
        assert np.array_equal(a.image(i), b.image(i))
        assert a.caption(i, 3) == b.caption(i, 3)
    assert a.caption(5, 0) != a.caption(5, 1) or a.caption(6, 0) != a.caption(6, 1)
    texts = " | ".join(a.caption(i, v) for i in range(240) for v in range(3))
    for name in THING_CLASSES + STUFF_CLASSES + list(PALETTE):
        assert name in texts, name
    for pred in PREDICATE_CLASSES:
        assert any(f" {w} " in texts for w in (pred, *PREDICATE_SYNONYMS[pred])), pred
    assert any(s in texts for syn in SHAPE_SYNONYMS.values() for s in syn)
    counts = {len(a.scene(i).thing_classes) for i in range(240)}
    assert counts == set(range(1, 9))
    crop, caption, box, negs = a.thing_crop(7, 0)
    assert crop.shape[0] == crop.shape[1] == box[2] - box[0] and caption.split()[-1]
    assert negs == []


def test_corpus_spec_mismatch_is_an_error(tmp_path):
    root = str(tmp_path / "c")
    build_corpus(root, CorpusSpec(seed=0, num_images=10, shard_size=10))
    with pytest.raises(ValueError, match="another corpus"):
        build_corpus(root, CorpusSpec(seed=1, num_images=10, shard_size=10))
    with pytest.raises(FileNotFoundError, match="no complete caption corpus"):
        Corpus(str(tmp_path / "missing"))


def test_corpus_seeds_are_disjoint_from_dataset_seeds():
    check_disjoint(0, [0, 5, 999_999])
    with pytest.raises(ValueError, match="DATASETS.SYNTHPSG.SEED=1000000"):
        check_disjoint(0, [CORPUS_SEED_OFFSET])
