"""CLIP's region loss: segments of corpus images, pooled from the dense features as stage 2 pools
them, classified among every class name; the frozen text tower of a region fine-tune."""

import math

import numpy as np
import pytest
import torch
from pretrain_helpers import tiny_cfg
from test_pretrain_steps import CFG

from spade.data.synthpsg import STUFF_CLASSES, THING_CLASSES
from spade.modeling.backbone.diffusion_backbone import clip_patch_embeddings
from spade.pretrain import run_pretraining
from spade.pretrain.clip import (
    REGION_VOCABULARY,
    ClipPretrainModel,
    clip_batches,
    region_loss,
    text_tower_parameters,
)
from spade.pretrain.corpus import Corpus, CorpusSpec, _shard_paths, build_corpus
from spade.utils.manifest import read_manifest

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                   "patch_size": 8, "pool_type": "avg"},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("region") / "corpus")
    build_corpus(root, CorpusSpec(seed=0, num_images=12, shard_size=6, image_size=64))
    return Corpus(root)


def test_region_loss_by_hand():
    # a 1 x 2 dense map of 2-d features: left cell (1, 0), right cell (0, 1)
    dense = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [1, D=2, 1, 2]
    masks = torch.tensor([[[[1.0, 0.0]], [[0.5, 0.5]], [[0.0, 0.0]]]])  # [1, S=3, 1, 2]
    labels = torch.tensor([[0, 1, -1]])  # the third row is padding
    vocabulary = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss, acc = region_loss(dense, masks, labels, vocabulary, torch.tensor(10.0))
    # segment 0 pools (1, 0): logits (10, 0), target 0; segment 1 pools (.5, .5) -> unit
    # (.707, .707): logits (7.07, 7.07), target 1
    l0 = -math.log(math.exp(10) / (math.exp(10) + 1))
    l1 = math.log(2.0)
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    assert acc == pytest.approx(0.5)  # segment 1 is a tie: argmax picks index 0, wrong
    # no real segment: zero loss that still back-propagates, accuracy 0
    dense.requires_grad_(True)
    loss, acc = region_loss(dense, masks, torch.full((1, 3), -1), vocabulary, torch.tensor(10.0))
    assert loss.item() == 0.0 and acc == 0.0
    loss.backward()


def test_segments_reproduce_the_stored_picture(corpus):
    for i in range(len(corpus)):
        masks, names = corpus.segments(i)
        scene = corpus.scene(i)
        assert names == [THING_CLASSES[c] for c in scene.thing_classes] + scene.stuff_names
        assert masks.shape == (len(names), 64, 64) and masks.dtype == bool
        # the visible masks partition the picture
        assert np.array_equal(masks.sum(0), np.ones((64, 64)))
        for k, box in enumerate(scene.thing_boxes):
            ys, xs = np.nonzero(masks[k])
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box


def test_a_stored_picture_that_is_not_its_rendering_is_an_error(tmp_path):
    root = str(tmp_path / "c")
    build_corpus(root, CorpusSpec(seed=0, num_images=4, shard_size=4, image_size=64))
    npy = _shard_paths(root, 0)[0]
    images = np.load(npy)
    images[2, 0, 0] = 255 - images[2, 0, 0]
    np.save(npy, images)
    corpus = Corpus(root)
    corpus.segments(1)  # the others are fine
    with pytest.raises(ValueError, match=r"stored image 2 differs from its rendering"):
        corpus.segments(2)


def test_region_batches(corpus):
    make = lambda: clip_batches(corpus, 8, 32, 0.5, seed=3, region_grid=4)  # noqa: E731
    batch = next(make())
    again = next(make())
    masks, labels = batch["region_masks"], batch["region_labels"]
    assert masks.shape[:2] == labels.shape and masks.shape[2:] == (4, 4)
    assert torch.equal(masks, again["region_masks"]) and torch.equal(labels, again["region_labels"])
    assert batch["region_texts"].shape == (len(REGION_VOCABULARY), 77)
    assert REGION_VOCABULARY == tuple(THING_CLASSES) + tuple(STUFF_CLASSES)
    whole = labels.ge(0).any(dim=1)
    assert 0 < int(whole.sum()) < 8  # crops carry no segment, whole images do
    for b in range(8):
        n = int(labels[b].ge(0).sum())
        assert bool(labels[b, n:].eq(-1).all()) and float(masks[b, n:].abs().sum()) == 0.0
        if n:  # area-resized masks of a partition still sum to one in every grid cell
            assert torch.allclose(masks[b, :n].sum(0), torch.ones(4, 4), atol=1e-5)


def test_image_embedding_is_the_mean_of_the_dense_features():
    model = ClipPretrainModel(TINY_CLIP, seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    dense = clip_patch_embeddings(model.clip.visual, x)
    assert dense.shape == (2, 16, 4, 4)
    expected = model.clip.encode_image(x, normalize=True)
    assert torch.allclose(model._pool_image(dense, x), expected, atol=1e-5)


def test_frozen_text_tower_gets_no_update(corpus):
    model = ClipPretrainModel(TINY_CLIP, seed=0, region_weight=1.0, train_text=False)
    text = {id(p) for p in text_tower_parameters(model.clip)}
    assert text and all(not p.requires_grad for p in text_tower_parameters(model.clip))
    assert model.clip.logit_scale.requires_grad
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    batch = next(clip_batches(corpus, 6, 32, 0.3, seed=1, negatives=2, region_grid=4))
    from detectron2.utils.events import EventStorage

    with EventStorage():
        losses = model(batch)
    assert set(losses) == {"loss_contrastive", "loss_region"}
    sum(losses.values()).backward()
    opt.step()
    after = model.clip.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("visual.") for k in changed)
    text_keys = {k for k, p in model.clip.named_parameters() if id(p) in text}
    assert not changed & text_keys


def test_region_pretraining_runs_and_resumes(stage0_root, tmp_path):
    extra = [
        "PRETRAIN.CLIP.REGION_WEIGHT", "1.0",
        "PRETRAIN.CLIP.TRAIN_TEXT", "False",
        "PRETRAIN.EXPORT_DIR", str(tmp_path / "clip_region"),
        "OUTPUT_DIR", str(tmp_path / "out_region"),
    ]  # fmt: skip
    cfg, args = tiny_cfg(CFG["clip"], stage0_root, "clip", max_iter=2, extra=extra)
    run_pretraining(cfg, args)
    assert read_manifest(str(tmp_path / "clip_region"))["iterations"] == 2
    metrics = (tmp_path / "out_region" / "metrics.json").read_text()
    assert "loss_region" in metrics and "region_acc" in metrics
    cfg, args = tiny_cfg(CFG["clip"], stage0_root, "clip", max_iter=3, resume=True, extra=extra)
    run_pretraining(cfg, args)
    assert read_manifest(str(tmp_path / "clip_region"))["iterations"] == 3


def test_region_config_continues_a_run_with_the_text_tower_frozen():
    import os

    from detectron2.config import get_cfg

    from spade.pretrain import add_pretrain_config

    cfg = get_cfg()
    add_pretrain_config(cfg)
    cfg.merge_from_file(os.path.join(os.path.dirname(CFG["clip"]), "clip_tiny_region.yaml"))
    assert cfg.PRETRAIN.CLIP.REGION_WEIGHT > 0 and not cfg.PRETRAIN.CLIP.TRAIN_TEXT
    assert cfg.MODEL.WEIGHTS.endswith("output/pretrain/clip/model_final.safetensors")
    assert cfg.PRETRAIN.EXPORT_DIR == "models/synthpsg-tiny-clip"
