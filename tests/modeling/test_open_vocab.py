"""Open vocabulary: text bank cache, cosine classifier, mask pooling, geometric fusion."""

import math

import pytest
import torch
import torch.nn.functional as F

from spade.modeling.backbone.loading import tokenize
from spade.modeling.open_vocab import (
    CosineClassifier,
    TextEmbeddingBank,
    TextWhitening,
    build_text_banks,
    geometric_fusion,
    joint_mask_pool,
    mask_pool,
    prompt_name,
    square_context_boxes,
)


def test_prompt_name():
    assert prompt_name("wall-other-merged") == "wall"
    assert prompt_name("dining_table") == "dining table"
    assert prompt_name("tree-merged") == "tree"
    assert prompt_name("in front of") == "in front of"


def test_text_bank_ensembles_templates_and_caches(tiny_clip):
    bank = TextEmbeddingBank(tiny_clip, ["a photo of a {}.", "there is a {}."])
    names = ["circle", "wall-other-merged"]
    emb = bank.get(names)
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-6)
    with torch.no_grad():
        per = [
            F.normalize(tiny_clip.model.encode_text(tokenize(tiny_clip, [t.format(n)])), dim=-1)
            for n in ("circle", "wall")
            for t in bank.templates
        ]
    expected = F.normalize(
        torch.stack([(per[0] + per[1])[0] / 2, (per[2] + per[3])[0] / 2]), dim=-1
    )
    assert torch.allclose(emb, expected, atol=1e-6)
    assert (bank.hits, bank.misses) == (0, 1)
    assert bank.get(list(names)) is emb  # same vocabulary: cache hit, same tensor
    assert (bank.hits, bank.misses) == (1, 1)
    other = bank.get(["circle", "square", "star"])  # vocabulary changed: recomputed
    assert other.shape == (3, 32) and (bank.hits, bank.misses) == (1, 2)
    assert torch.allclose(other[0], emb[0])
    bank.clear()
    bank.get(names)
    assert bank.misses == 3


def test_text_bank_lru_eviction_and_bad_input(tiny_clip):
    bank = TextEmbeddingBank(tiny_clip, ["{}"], max_entries=1)
    bank.get(["a"])
    bank.get(["b"])
    bank.get(["a"])
    assert (bank.hits, bank.misses) == (0, 3)
    with pytest.raises(ValueError, match="empty"):
        bank.get([])
    with pytest.raises(TypeError):
        bank.get("circle")
    with pytest.raises(ValueError, match="exactly one"):
        TextEmbeddingBank(tiny_clip, ["no placeholder"])


def test_cosine_classifier_hand_values_and_vocab_change():
    clf = CosineClassifier(dim=2, logit_scale_init=math.log(10.0))
    with torch.no_grad():
        clf.background.copy_(torch.tensor([0.0, -1.0]))
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    logits = clf(x, text)
    s = 1 / math.sqrt(2)
    expected = 10.0 * torch.tensor([[1.0, 0.0, 0.0], [s, s, -s]])
    assert torch.allclose(logits, expected, atol=1e-5)
    bigger = clf(x, torch.cat([text, torch.tensor([[-1.0, 0.0]])]))  # vocabulary replaced
    assert bigger.shape == (2, 4) and torch.allclose(bigger[:, -1], expected[:, -1])
    logits.sum().backward()
    assert clf.logit_scale.grad is not None and clf.background.grad is not None
    with pytest.raises(ValueError, match="dim=2"):
        clf(torch.zeros(1, 3), text)


def test_cosine_classifier_temperature_is_clamped():
    clf = CosineClassifier(dim=2, logit_scale_init=10.0)
    out = clf(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert out[0, 0].item() == pytest.approx(100.0, rel=1e-4)


def test_text_whitening_hand_values():
    # reference: (+-a, 1) in 2-D; mean (0, 1), covariance diag(a^2, 0); tr / D = a^2 / 2
    a = 0.1
    ref = torch.tensor([[a, 1.0], [-a, 1.0]])
    # s = 1 only centres
    w = TextWhitening(2, 1.0).fit(ref)
    assert torch.allclose(w(ref), torch.tensor([[a, 0.0], [-a, 0.0]]), atol=1e-6)
    # s = 0.5: S = diag(0.5 a^2 + 0.25 a^2, 0.25 a^2); W = P S^-1/2 * a / sqrt(2), P = diag(1, 0)
    # (the reference names span only the first axis)
    w = TextWhitening(2, 0.5).fit(ref)
    k = a / math.sqrt(2)
    expected_w = torch.diag(torch.tensor([k / math.sqrt(0.75 * a * a), 0.0]))
    assert torch.allclose(w.matrix, expected_w, atol=1e-5)
    assert torch.allclose(w.mean, torch.tensor([0.0, 1.0]))
    # another name goes through the same fixed map: centred (0.05, 0.5), of which only the part in
    # the reference span is kept (S^-1/2 alone would have scaled the 0.5 by k / sqrt(0.25 a^2))
    novel = torch.tensor([[0.05, 1.5]])
    assert torch.allclose(w(novel), torch.tensor([[0.05 * k / math.sqrt(0.75 * a * a), 0.0]]))
    # s = 1 centres and projects
    assert torch.allclose(TextWhitening(2, 1.0).fit(ref)(novel), torch.tensor([[0.05, 0.0]]))


def test_text_whitening_novel_residual_does_not_dominate():
    # 4 names span 3 of 16 directions. A query trained against them (a whitened name plus a
    # larger untrained component along a novel name's residual outside that span) must still
    # pick its name: unprojected, the shrinkage scales the novel residual up ~23x relative to the
    # reference directions (sqrt(16 / (0.01 * 3))) and the novel name wins.
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 16, generator=gen)
    centred = ref - ref.mean(0)
    basis = torch.linalg.svd(centred.t(), full_matrices=False)[0][:, :3]
    residual = torch.randn(16, generator=gen)
    residual = F.normalize(residual - basis @ (basis.t() @ residual), dim=0)
    novel = (ref.mean(0) + 0.3 * centred[1] + 2.0 * residual)[None]
    w = TextWhitening(16, 0.01).fit(ref)
    white = w(ref)
    query = white[0] + 2.0 * white[0].norm() * residual
    logits = CosineClassifier(16, math.log(10.0), text_whitening=0.01)
    logits.whitening.fit(ref)
    scores = logits(query[None], torch.cat([ref, novel]))[0, :5]
    assert scores.argmax().item() == 0
    # the projection leaves the reference names where plain shrunk whitening puts them
    x = centred.double()
    cov = x.t() @ x / 4
    scale = torch.trace(cov) / 16
    values, vectors = torch.linalg.eigh(0.99 * cov + 0.01 * scale * torch.eye(16, dtype=x.dtype))
    plain = x @ vectors @ torch.diag(values.rsqrt()) @ vectors.t() * scale.sqrt()
    assert torch.allclose(white.double(), plain, atol=1e-4)
    # ... and the novel name, unprojected, would have taken the query
    plain_novel = (
        (novel.double() - ref.double().mean(0))
        @ vectors
        @ torch.diag(values.rsqrt())
        @ vectors.t()
        * scale.sqrt()
    )
    cos_plain = F.cosine_similarity(query.double()[None], plain_novel)
    cos_ref0 = F.cosine_similarity(query.double()[None], plain[:1])
    assert cos_plain.item() > cos_ref0.item()


def test_text_whitening_separates_nearly_collinear_names():
    # two names at cosine 0.999 (the tiny CLIP's "above" / "below"): a cosine classifier cannot
    # tell them apart by more than ~4.5 logits even at temperature 100; whitened, it can
    gen = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(1, 8, generator=gen), dim=-1)
    ref = F.normalize(base + 0.02 * torch.randn(5, 8, generator=gen), dim=-1)
    assert (ref @ ref.t()).min() > 0.99
    white = F.normalize(TextWhitening(8, 0.01).fit(ref)(ref), dim=-1)
    off = (white @ white.t())[~torch.eye(5, dtype=torch.bool)]
    assert off.max() < 0.05  # the 5 names end near a regular simplex (cosine -1/4)
    assert off.mean().item() == pytest.approx(-0.25, abs=0.02)
    clf = CosineClassifier(8, math.log(10.0), text_whitening=0.01)
    with pytest.raises(RuntimeError, match="before fit"):
        clf(torch.zeros(1, 8), ref)
    clf.whitening.fit(ref)
    logits = clf(white, ref)  # a query along a whitened name picks that name
    assert torch.equal(logits[:, :5].argmax(dim=1), torch.arange(5))
    assert "whitening.mean" not in clf.state_dict()  # recomputed at build, never checkpointed


def test_text_whitening_bad_input():
    with pytest.raises(ValueError, match="shrinkage"):
        TextWhitening(4, 0.0)
    with pytest.raises(ValueError, match="N >= 2"):
        TextWhitening(4, 0.1).fit(torch.ones(1, 4))
    with pytest.raises(ValueError, match="D=4"):
        TextWhitening(4, 0.1).fit(torch.ones(3, 5))
    with pytest.raises(ValueError, match="identical"):
        TextWhitening(4, 0.1).fit(torch.ones(3, 4))


def test_square_context_boxes_hand_values():
    boxes = torch.tensor(
        [
            [10.0, 20.0, 30.0, 30.0],  # 20 x 10, x1.5 -> side 30 around (20, 25)
            [0.0, 0.0, 10.0, 10.0],  # side 20 around (5, 5): shifted right / down into the image
            [90.0, 90.0, 100.0, 100.0],  # side 20 around (95, 95): shifted left / up
            [5.0, 5.0, 5.0, 5.0],  # empty mask: the largest centred square
            [50.0, 50.0, 51.0, 51.0],  # tiny: at least 1/8 of the shorter side
        ]
    )
    scales = [1.5, 2.0, 2.0, 2.0, 1.6]
    out = torch.stack([square_context_boxes(b, s, 100, 100) for b, s in zip(boxes, scales)])
    expected = torch.tensor(
        [
            [5.0, 10.0, 35.0, 40.0],
            [0.0, 0.0, 20.0, 20.0],
            [80.0, 80.0, 100.0, 100.0],
            [0.0, 0.0, 100.0, 100.0],
            [44.25, 44.25, 56.75, 56.75],
        ]
    )
    assert torch.allclose(out, expected)
    # a wide image: the side is capped by its height; batched shapes are kept
    wide = square_context_boxes(torch.tensor([[[0.0, 0.0, 80.0, 40.0]]]), 2.0, 50, 100)
    assert wide.shape == (1, 1, 4) and torch.allclose(
        wide, torch.tensor([[[15.0, 0.0, 65.0, 50.0]]])
    )


def test_mask_pool_hand_values_and_empty_masks():
    features = torch.arange(8.0).view(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    masks = torch.zeros(1, 3, 2, 2)
    masks[0, 0, 0, 0] = 1.0  # one pixel
    masks[0, 1] = torch.tensor([[0.0, 1.0], [0.0, 0.5]])  # weighted
    pooled = mask_pool(features, masks)  # mask 2 is empty
    assert torch.allclose(pooled[0, 0], torch.tensor([0.0, 4.0]))
    assert torch.allclose(pooled[0, 1], torch.tensor([(1 + 1.5) / 1.5, (5 + 3.5) / 1.5]))
    assert torch.equal(pooled[0, 2], torch.zeros(2))
    # masks at 4x4 are resized to the 2x2 map: a full top half stays the top half
    big = torch.zeros(1, 1, 4, 4)
    big[0, 0, :2] = 1.0
    assert torch.allclose(mask_pool(features, big, threshold=0.5)[0, 0], torch.tensor([0.5, 4.5]))
    assert mask_pool(features, torch.zeros(1, 0, 4, 4)).shape == (1, 0, 2)  # no queries
    with pytest.raises(ValueError, match="B, Q, H, W"):
        mask_pool(features, torch.zeros(3, 2, 2))


def test_joint_mask_pool_uses_union():
    features = torch.arange(8.0).view(1, 2, 2, 2)
    masks = torch.zeros(1, 3, 2, 2)
    masks[0, 0, 0, 0] = 1.0
    masks[0, 1, 1, 1] = 1.0
    masks[0, 2, 0, 0] = 1.0
    pairs = torch.tensor([[[0, 1], [0, 2], [1, 1]]])
    pooled = joint_mask_pool(features, masks, pairs)
    assert torch.allclose(pooled[0, 0], torch.tensor([1.5, 5.5]))  # pixels 0 and 3
    assert torch.allclose(pooled[0, 1], torch.tensor([0.0, 4.0]))  # overlapping: pixel 0 once
    assert torch.allclose(pooled[0, 2], torch.tensor([3.0, 7.0]))
    assert joint_mask_pool(features, masks, torch.zeros(1, 0, 2, dtype=torch.long)).shape == (
        1,
        0,
        2,
    )
    with pytest.raises(ValueError, match="outside"):
        joint_mask_pool(features, masks, torch.tensor([[[0, 3]]]))


def test_geometric_fusion_hand_values():
    p_diff = torch.tensor([[0.5, 0.2, 0.3]])  # 2 classes + background
    p_clip = torch.tensor([[0.25, 0.75]])
    raw = geometric_fusion(p_diff, p_clip, alpha=0.5, beta=0.2, normalize=False)
    assert torch.allclose(raw, torch.tensor([[math.sqrt(0.125), math.sqrt(0.15), 0.3]]))
    novel = torch.tensor([False, True])
    raw = geometric_fusion(p_diff, p_clip, alpha=0.34, beta=0.2, novel_mask=novel, normalize=False)
    f0, f1 = 0.5**0.34 * 0.25**0.66, 0.2**0.2 * 0.75**0.8
    assert torch.allclose(raw, torch.tensor([[f0, f1, 0.3]]), atol=1e-6)
    fused = geometric_fusion(p_diff, p_clip, alpha=0.34, beta=0.2, novel_mask=novel)
    expected = torch.tensor([[0.7 * f0 / (f0 + f1), 0.7 * f1 / (f0 + f1), 0.3]])
    assert torch.allclose(fused, expected, atol=1e-6)
    assert torch.allclose(fused.sum(-1), torch.ones(1))
    no_bg = geometric_fusion(p_diff[:, :2], p_clip, alpha=1.0, beta=1.0)
    assert torch.allclose(no_bg, torch.tensor([[5 / 7, 2 / 7]]), atol=1e-6)
    with pytest.raises(ValueError, match="N or N \\+ 1"):
        geometric_fusion(torch.rand(1, 5), p_clip, 0.34, 0.34)
    with pytest.raises(ValueError, match="novel_mask"):
        geometric_fusion(p_diff, p_clip, 0.34, 0.34, novel_mask=torch.tensor([True]))


def test_text_banks_from_config(make_cfg, tiny_clip):
    cfg = make_cfg()
    class_bank, predicate_bank = build_text_banks(cfg, tiny_clip)
    assert class_bank.templates == list(cfg.MODEL.SPADE.OPEN_VOCAB.TEMPLATES)
    assert predicate_bank.templates == list(cfg.MODEL.SPADE.OPEN_VOCAB.PREDICATE_TEMPLATES)
    assert class_bank.get(["star", "ring"]).shape == (2, 32)
