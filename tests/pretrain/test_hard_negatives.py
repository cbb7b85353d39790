"""CLIP's shape-swapped hard negatives, the data-loader workers and the wall-clock budget."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from pretrain_helpers import tiny_cfg
from test_pretrain_steps import CFG

from spade.data.synthpsg import THING_CLASSES
from spade.pretrain import run_pretraining
from spade.pretrain.captions import SHAPE_SYNONYMS, shape_negatives
from spade.pretrain.clip import clip_batches, hard_negative_clip_loss
from spade.pretrain.corpus import Corpus, CorpusSpec, SceneText, build_corpus
from spade.pretrain.engine import worker_batches
from spade.utils.manifest import read_manifest


def _scene():
    return SceneText(
        thing_classes=[THING_CLASSES.index("star")],
        thing_colours=["red"],
        thing_radii=[20.0],
        thing_boxes=[[10, 10, 50, 50]],
        stuff_names=["sky"],
        candidates=[],
        image_size=128,
    )


def _shape_of(caption: str) -> str:
    names = {n: c for c in THING_CLASSES for n in (c, *SHAPE_SYNONYMS.get(c, ()))}
    found = [names[n] for n in sorted(names, key=len, reverse=True) if caption.endswith(n)]
    return found[0]


def test_negatives_differ_from_the_caption_only_in_the_shape():
    scene = _scene()
    negs = shape_negatives(scene, 0, (0, 5, 0, 1), synonym_prob=0.0, count=3)
    assert len(negs) == 3
    # radius 20 of 128 is 15.6 %: "large"; colour kept (colour_drop 0)
    shapes = [_shape_of(n) for n in negs]
    assert len(set(shapes)) == 3 and "star" not in shapes
    for n, shape in zip(negs, shapes):
        assert n == f"a large red {shape}"
    # every other shape at most once, even when more are asked for than exist
    all_negs = shape_negatives(scene, 0, (0, 5, 0, 1), synonym_prob=0.0, count=100)
    assert sorted(_shape_of(n) for n in all_negs) == sorted(set(THING_CLASSES) - {"star"})
    assert shape_negatives(scene, 0, (0, 5, 0, 1), 0.0, 3) == negs  # deterministic


def test_crop_negatives_share_the_captions_words_and_template(tmp_path):
    root = str(tmp_path / "c")
    build_corpus(root, CorpusSpec(seed=0, num_images=40, shard_size=20, image_size=64))
    corpus = Corpus(root, synonym_prob=0.0)
    templated = 0
    for i in range(40):
        _, caption, _, negs = corpus.thing_crop(i, 0, negatives=2)
        true_shape = _shape_of(caption.rstrip("."))
        assert true_shape in [THING_CLASSES[c] for c in corpus.scene(i).thing_classes]
        assert len(negs) == 2
        templated += caption.startswith(("a photo of", "a picture of", "this is"))
        for n in negs:
            a, b = caption.split(), n.split()
            # the same words but the shape (and "a"/"an" before a vowel)
            diff = [(x, y) for x, y in zip(a, b) if x != y]
            assert len(a) == len(b) and 1 <= len(diff) <= 2, (caption, n)
            assert _shape_of(n.rstrip(".")) != true_shape
        # without negatives the crop and its caption are the same
        assert corpus.thing_crop(i, 0)[1] == caption
    assert 0 < templated < 40


def test_hard_negative_loss_by_hand():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 8), dim=1)
    txt = F.normalize(torch.randn(3, 8), dim=1)
    scale = torch.tensor(10.0)
    # without negatives: open_clip's ClipLoss
    empty = torch.zeros(0, 8)
    loss, _ = hard_negative_clip_loss(img, txt, empty, torch.zeros(0, dtype=torch.long), scale)
    assert torch.allclose(loss, ClipLoss()(img, txt, scale))
    # one negative for image 1, equal to image 1 itself (cosine 1): it enters only row 1
    neg = img[1:2].clone()
    loss, extra = hard_negative_clip_loss(img, txt, neg, torch.tensor([1]), scale)
    logits = scale * img @ txt.T
    row1 = torch.cat([logits[1], scale * torch.ones(1)])
    i2t = (
        F.cross_entropy(logits[0:1], torch.tensor([0]))
        + F.cross_entropy(row1[None], torch.tensor([1]))
        + F.cross_entropy(logits[2:3], torch.tensor([2]))
    ) / 3
    t2i = F.cross_entropy(logits.T, torch.arange(3))
    assert torch.allclose(loss, (i2t + t2i) / 2)
    assert extra["hard_negative_acc"] == 0.0  # cosine 1 beats any caption
    _, extra = hard_negative_clip_loss(img, txt, -txt[1:2], torch.tensor([1]), scale)
    assert extra["hard_negative_acc"] == float(img[1] @ txt[1] > img[1] @ -txt[1])


def _flat(batch):
    return [batch["captions"], batch["neg_texts"].tolist(), batch["neg_owner"].tolist()]


def test_worker_batches_are_deterministic_and_one_worker_is_the_plain_stream(tmp_path):
    root = str(tmp_path / "c")
    build_corpus(root, CorpusSpec(seed=0, num_images=24, shard_size=12, image_size=64))
    corpus = Corpus(root)

    def make(**kw):
        return clip_batches(corpus, 4, 32, 0.5, seed=3, negatives=2, **kw)

    plain = [_flat(next(make(worker=0, num_workers=1))) for _ in range(1)]
    inline = worker_batches(make, 0)
    assert _flat(next(inline)) == plain[0]
    runs = []
    for _ in range(2):
        it = worker_batches(make, 2)
        runs.append([_flat(next(it)) for _ in range(4)])
    assert runs[0] == runs[1]
    # round robin: batches 0 and 2 come from worker 0, 1 and 3 from worker 1
    w1 = make(worker=1, num_workers=2)
    assert runs[0][1] == _flat(next(w1)) and runs[0][3] == _flat(next(w1))
    assert any(len(b[2]) for b in runs[0])  # some crops carried negatives


def test_wall_budget_ends_training_and_the_manifest_says_where(stage0_root, tmp_path):
    cfg, args = tiny_cfg(
        CFG["clip"],
        stage0_root,
        "clip",
        max_iter=1000,
        extra=[
            "PRETRAIN.MAX_WALL_SECONDS", "0.001",
            "PRETRAIN.CLIP.HARD_NEGATIVES", "2",
            "PRETRAIN.CLIP.CROP_PROB", "1.0",
            "PRETRAIN.EXPORT_DIR", str(tmp_path / "clip_budget"),
            "OUTPUT_DIR", str(tmp_path / "out_budget"),
        ],
    )  # fmt: skip
    run_pretraining(cfg, args)
    manifest = read_manifest(str(tmp_path / "clip_budget"))
    assert manifest["iterations"] == 1  # the first step already passed the budget
    rows = [json.loads(line) for line in open(tmp_path / "out_budget" / "metrics.json")]
    assert any("hard_negative_acc" in r for r in rows)
    assert np.isfinite([r["total_loss"] for r in rows if "total_loss" in r]).all()


@pytest.mark.parametrize("bad", ["-1.0", "0.0"])
def test_negative_budget_means_none(bad, stage0_root, tmp_path):
    cfg, args = tiny_cfg(
        CFG["clip"],
        stage0_root,
        "clip",
        max_iter=2,
        extra=[
            "PRETRAIN.MAX_WALL_SECONDS", bad,
            "PRETRAIN.EXPORT_DIR", str(tmp_path / "clip_nb"),
            "OUTPUT_DIR", str(tmp_path / "out_nb"),
        ],
    )  # fmt: skip
    run_pretraining(cfg, args)
    assert read_manifest(str(tmp_path / "clip_nb"))["iterations"] == 2


def test_wall_budget_fits_the_schedule_to_the_time(monkeypatch):
    from types import SimpleNamespace

    from spade.pretrain import engine

    clock = [0.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])
    trainer = SimpleNamespace(iter=0, max_iter=1000, scheduler=SimpleNamespace(_max_iter=1000))
    hook = engine.WallBudget(100.0, probe=10, skip=2)
    hook.trainer = trainer
    hook.before_train()
    ended = None
    for it in range(1000):
        trainer.iter = it
        clock[0] += 0.5 if it else 5.5  # a slow first step, then 0.5 s: 190 of 1000 fit
        try:
            hook.after_step()
        except engine.WallBudgetReached:
            ended = it + 1
            break
    assert hook.stop_at == 190 and trainer.scheduler._max_iter == 190 and ended == 190
    # a run that fits keeps its schedule
    trainer = SimpleNamespace(iter=0, max_iter=100, scheduler=SimpleNamespace(_max_iter=100))
    hook = engine.WallBudget(100.0, probe=10, skip=2)
    hook.trainer = trainer
    hook.before_train()
    for it in range(100):
        trainer.iter = it
        clock[0] += 0.5
        hook.after_step()
    assert hook.stop_at is None and trainer.scheduler._max_iter == 100


def test_parallel_corpus_build_equals_the_serial_one(tmp_path):
    from spade.pretrain.corpus import build_corpus_parallel

    spec = CorpusSpec(seed=0, num_images=30, shard_size=10, image_size=64)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build_corpus(a, spec)
    build_corpus_parallel(b, spec, processes=2)
    ca, cb = Corpus(a), Corpus(b)
    for i in range(30):
        assert np.array_equal(ca.image(i), cb.image(i)) and ca.scene(i) == cb.scene(i)


def test_code_commit_can_be_stated_by_the_environment(monkeypatch, tmp_path):
    from spade.utils.manifest import code_commit

    assert code_commit(str(tmp_path)) == "unknown"  # no git there
    monkeypatch.setenv("SPADE_CODE_COMMIT", "abc123")
    assert code_commit(str(tmp_path)) == "abc123"


def test_unet_heads_are_diffusers_heads_and_head_channels_override(stage0_root):
    from diffusers import UNet2DConditionModel

    from spade.pretrain.unet import unet_config

    cfg, _ = tiny_cfg(CFG["unet"], stage0_root, "unet")  # BLOCK_OUT_CHANNELS [16, 32], 8 "dims"

    def heads(config):
        unet = UNet2DConditionModel(**config)
        return [m.heads for n, m in unet.named_modules() if n.endswith("attn2")]

    cfg.defrost()
    cfg.PRETRAIN.UNET.HEAD_CHANNELS = 0  # off: ATTENTION_HEAD_DIM as diffusers reads it
    # diffusers reads attention_head_dim as the number of heads: 8 heads at every level
    assert set(heads(unet_config(cfg, 32, 4, 8))) == {8}
    cfg.PRETRAIN.UNET.HEAD_CHANNELS = 8  # 16 / 8 = 2 heads at level 0, 32 / 8 = 4 below
    config = unet_config(cfg, 32, 4, 8)
    assert config["attention_head_dim"] == (2, 4)
    assert sorted(set(heads(config))) == [2, 4]
    cfg.PRETRAIN.UNET.HEAD_CHANNELS = 12
    with pytest.raises(ValueError, match="HEAD_CHANNELS=12 does not divide"):
        unet_config(cfg, 32, 4, 8)
