"""SPADE meta-architecture: losses, gradients reach trainable parts only, panoptic inference,
vocabulary, relation-head plumbing; any detectron2 backbone (a tiny ResNet here) and the TINY
diffusion backbone.
"""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances

import spade.modeling  # noqa: F401  (registers SPADE, the backbone and the heads)
from spade.config import add_spade_config
from spade.modeling.meta_arch import panoptic_inference
from spade.modeling.meta_arch.query_classifier import MaskShapeEmbedding

THINGS, STUFF, PREDICATES = ["disc", "box", "star"], ["sky", "grass"], ["left of", "above", "on"]
DATASET = "spade_test_meta_arch"
MetadataCatalog.get(DATASET).set(
    thing_classes=THINGS, stuff_classes=STUFF, predicate_classes=PREDICATES
)


def tiny_cfg(backbone="resnet", relation=False, open_vocab=False):
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "SPADE"
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [123.7, 116.3, 103.5], [58.4, 57.1, 57.4]
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (DATASET,), (DATASET,)
    if backbone == "resnet":
        cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
        cfg.MODEL.BACKBONE.FREEZE_AT = 2  # stem + res2 frozen
        r = cfg.MODEL.RESNETS
        r.DEPTH, r.RES2_OUT_CHANNELS, r.STEM_OUT_CHANNELS, r.NORM = 18, 64, 16, "FrozenBN"
        r.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    else:
        cfg.MODEL.BACKBONE.NAME = "build_diffusion_backbone"
        cfg.MODEL.SPADE.DIFFUSION.OUT_CHANNELS = 32
    p = cfg.MODEL.SPADE.PIXEL_DECODER
    p.CONVS_DIM, p.MASK_DIM, p.ENCODER_LAYERS, p.NHEADS, p.NPOINTS, p.DIM_FEEDFORWARD = (
        32,
        32,
        1,
        4,
        2,
        64,
    )
    m = cfg.MODEL.SPADE.MASK_HEAD
    m.NUM_OBJECT_QUERIES, m.HIDDEN_DIM, m.NHEADS, m.DIM_FEEDFORWARD, m.DEC_LAYERS = 8, 32, 4, 64, 3
    m.TRAIN_NUM_POINTS, m.OPEN_VOCAB = 128, open_vocab
    rel = cfg.MODEL.SPADE.RELATION
    rel.ENABLED, rel.HIDDEN_DIM, rel.NHEADS, rel.NUM_PAIRS = relation, 32, 4, 16
    cfg.MODEL.SPADE.TEST.OBJECT_MASK_THRESHOLD = 0.0
    return cfg


def make_input(gen, num_segments, size=(64, 48), out_size=None, relations=True):
    h, w = size
    inst = Instances(size)
    inst.gt_classes = torch.arange(num_segments) % (len(THINGS) + len(STUFF))
    inst.gt_masks = torch.rand(num_segments, h, w, generator=gen) > 0.5
    rel = [[0, 1, 2]] if relations and num_segments >= 2 else []
    return {
        "image": torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8),
        "height": (out_size or size)[0],
        "width": (out_size or size)[1],
        "image_id": f"img{num_segments}",
        "instances": inst,
        "gt_relations": torch.tensor(rel, dtype=torch.long).view(-1, 3),
    }


def check_panoptic(result, height, width, num_classes):
    seg, segments_info = result["panoptic_seg"]
    assert seg.dtype == torch.int32 and tuple(seg.shape) == (height, width)
    ids = [s["id"] for s in segments_info]
    assert len(set(ids)) == len(ids) and all(i >= 1 for i in ids)
    assert set(torch.unique(seg).tolist()) - {0} == set(ids)  # every id has pixels, no stray id
    assert all(0 <= s["category_id"] < num_classes for s in segments_info)


def grads_reach_trainable_only(model, losses):
    sum(losses.values()).backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen, "the test needs frozen parameters"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_resnet_training_losses_and_gradients():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build_model(tiny_cfg()).train()
    losses = model([make_input(gen, 3), make_input(gen, 0)])  # second image: empty ground truth
    suffixes = ["", "_0", "_1", "_2"]  # final layer + 3 intermediate predictions
    assert set(losses) == {f"loss_{t}{s}" for t in ("ce", "mask", "dice") for s in suffixes}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    grads_reach_trainable_only(model, losses)
    # backbone stem and res2 frozen by FREEZE_AT
    assert not model.backbone.stem.conv1.weight.requires_grad
    assert model.backbone.res3[0].conv1.weight.grad is not None


def test_diffusion_backbone_open_vocab_gradients_reach_trainable_only():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = build_model(tiny_cfg("diffusion", open_vocab=True)).train()
    losses = model([make_input(gen, 4)])
    grads_reach_trainable_only(model, losses)
    assert all(not p.requires_grad for p in model.backbone.unet.parameters() if p.grad is None)
    assert model.classifier.cosine.background.grad is not None
    # inference fuses the CLIP mask-pooled branch: still a distribution, no-object kept as is
    model.eval()
    assert model.use_clip_branch
    images = model.preprocess_image([make_input(gen, 1)])
    with torch.no_grad():
        outputs = model.predict(images)
        clip_features = model.backbone.clip_dense_features(images.tensor)
        fused = model.class_probabilities(outputs, clip_features)
        plain = model.class_probabilities(outputs, None)
        check_panoptic(model([make_input(gen, 1, out_size=(32, 24))])[0], 32, 24, 5)
    torch.testing.assert_close(fused.sum(-1), torch.ones(fused.shape[:2]))
    torch.testing.assert_close(fused[..., -1], plain[..., -1])
    assert not torch.allclose(fused, plain)


def test_clip_crop_branch_mixes_crops_for_things():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)
    cfg = tiny_cfg("diffusion", open_vocab=True)
    cfg.MODEL.SPADE.OPEN_VOCAB.CLIP_CROP_SCALE = 1.6
    cfg.MODEL.SPADE.OPEN_VOCAB.FUSION_ALPHA = cfg.MODEL.SPADE.OPEN_VOCAB.FUSION_BETA = 0.0
    model = build_model(cfg).eval()
    images = model.preprocess_image([make_input(gen, 1)])
    with torch.no_grad():
        outputs = model.predict(images)
        clip_features = model.backbone.clip_dense_features(images.tensor)
        mixed = model.class_probabilities(outputs, clip_features, images.tensor)
        text = torch.nn.functional.normalize(model.class_text_embeddings(), dim=-1)
        p_crop = model.clip_crop_probabilities(images.tensor, outputs["pred_masks"], text)
        with pytest.raises(ValueError, match="needs `images`"):
            model.class_probabilities(outputs, clip_features)
        model.clip_crop_scale = 0.0
        pooled = model.class_probabilities(outputs, clip_features, images.tensor)
        result = model([make_input(gen, 1)])[0]  # the crop path runs end to end
    check_panoptic(result, 64, 48, 5)
    # alpha = 0: the object part is P_clip scaled to 1 - p(no-object); P_clip = w P_crop +
    # (1 - w) P_pooled with w the diffusion branch's thing share
    p_diff = outputs["pred_logits"].softmax(-1)
    objects = p_diff[..., :-1]
    w = objects[..., : len(THINGS)].sum(-1, keepdim=True) / objects.sum(-1, keepdim=True)
    keep = 1 - p_diff[..., -1:]
    expected = (w * p_crop + (1 - w) * pooled[..., :-1] / keep) * keep
    torch.testing.assert_close(mixed[..., :-1], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[..., -1], pooled[..., -1])
    assert not torch.allclose(mixed, pooled)
    torch.testing.assert_close(p_crop.sum(-1), torch.ones(p_crop.shape[:2]))


def test_clip_crop_boxes_come_from_masks_at_image_resolution():
    torch.manual_seed(0)
    cfg = tiny_cfg("diffusion", open_vocab=True)
    cfg.MODEL.SPADE.OPEN_VOCAB.CLIP_CROP_SCALE = 1.0
    model = build_model(cfg).eval()
    seen = []

    def spy(images, boxes):
        seen.append(boxes.clone())
        return torch.randn(*boxes.shape[:-1], model.class_text_embeddings().shape[1])

    model.backbone.clip_crop_embeddings = spy
    # a 4 x 4 mask map of a 16 x 16 image: columns -10, 10, 2, -10 on rows 1-2. Its cells give
    # the box x [4, 12); bilinear upsampling puts the mask's edge inside column 2 (pixels 4-10
    # positive: at pixel 10 the logit is 2 - 12 x 0.125 = 0.5, at 11 it is -2.5), y [4, 12).
    logits = torch.full((1, 1, 4, 4), -10.0)
    logits[0, 0, 1:3] = torch.tensor([-10.0, 10.0, 2.0, -10.0])
    text = torch.nn.functional.normalize(model.class_text_embeddings(), dim=-1)
    with torch.no_grad():
        model.clip_crop_probabilities(torch.zeros(1, 3, 16, 16), logits, text)
    # tight box x [4, 11), y [4, 12) -> square of side 8 centred on (7.5, 8)
    torch.testing.assert_close(seen[0], torch.tensor([[[3.5, 4.0, 11.5, 12.0]]]))


def test_inference_output_at_original_size_and_empty_result():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    model = build_model(tiny_cfg()).eval()
    with torch.no_grad():
        model.classifier.linear.bias[-1] = -20.0  # untrained: make no-object unlikely
    model.overlap_threshold = 0.0
    with torch.no_grad():
        results = model([make_input(gen, 2, out_size=(96, 72)), make_input(gen, 1, size=(40, 56))])
    assert len(results) == 2 and set(results[0]) == {"panoptic_seg"}  # no relation head
    check_panoptic(results[0], 96, 72, 5)
    check_panoptic(results[1], 40, 56, 5)
    assert len(results[0]["panoptic_seg"][1]) > 0  # thresholds 0: some query is kept
    model.object_mask_threshold = 1.0  # nothing can pass: an all-void result
    with torch.no_grad():
        seg, info = model([make_input(gen, 1)])[0]["panoptic_seg"]
    assert info == [] and int(seg.abs().sum()) == 0


def test_panoptic_inference_hand_made():
    # 4 x 4 image; classes: 0 thing, 1 thing, 2 stuff (+ no-object 3)
    probs = torch.tensor(
        [
            [0.90, 0.05, 0.03, 0.02],  # q0 thing 0: left half
            [0.02, 0.02, 0.90, 0.06],  # q1 stuff 2: right half, top
            [0.02, 0.02, 0.85, 0.11],  # q2 stuff 2: right half, bottom -> merged with q1
            [0.01, 0.01, 0.01, 0.97],  # q3 no-object -> dropped
            [0.05, 0.85, 0.05, 0.05],  # q4 thing 1: inside q0 with a lower score -> loses overlap
            [0.10, 0.70, 0.10, 0.10],  # q5 below object_mask_threshold -> dropped
        ]
    )
    masks = torch.full((6, 4, 4), -10.0)
    masks[0, :, :2] = 10
    masks[1, :2, 2:] = 10
    masks[2, 2:, 2:] = 10
    masks[3] = 10
    masks[4, :2, :2] = 10
    masks[5, 3, :] = 10
    seg, info, q2s = panoptic_inference(
        probs, masks, [True, True, False], object_mask_threshold=0.8, overlap_threshold=0.8
    )
    expected = torch.tensor([[1, 1, 2, 2]] * 4, dtype=torch.int32)
    assert torch.equal(seg, expected)
    assert info == [
        {"id": 1, "category_id": 0, "isthing": True, "score": pytest.approx(0.90)},
        {"id": 2, "category_id": 2, "isthing": False, "score": pytest.approx(0.90)},
    ]
    assert q2s.tolist() == [1, 2, 2, 0, 0, 0]
    # all no-object: nothing kept
    seg, info, q2s = panoptic_inference(
        probs[3:4],
        masks[3:4],
        [True, True, False],
        object_mask_threshold=0.8,
        overlap_threshold=0.8,
    )
    assert info == [] and int(seg.sum()) == 0 and q2s.tolist() == [0]
    with pytest.raises(ValueError, match="is_thing"):
        panoptic_inference(probs, masks, [True], object_mask_threshold=0.8, overlap_threshold=0.8)
    with pytest.raises(ValueError, match="masks"):
        panoptic_inference(
            probs, masks[:2], [True] * 3, object_mask_threshold=0.8, overlap_threshold=0.8
        )


def test_panoptic_inference_reassigns_pixels_of_dropped_queries():
    # 1 x 4 image; classes: 0 thing, 1 stuff (+ no-object 2)
    probs = torch.tensor(
        [
            [0.60, 0.30, 0.10],  # q0 thing: pixels 0-1
            [0.70, 0.20, 0.10],  # q1 thing: pixels 1-3, outscores q0 on pixel 1
            [0.05, 0.90, 0.05],  # q2 stuff: pixels 2-3, outscores q1 there
        ]
    )
    masks = torch.full((3, 1, 4), -10.0)
    masks[0, 0, :2] = 10
    masks[1, 0, 1:] = 10
    masks[2, 0, 2:] = 10
    kw = dict(object_mask_threshold=0.5, overlap_threshold=0.8)
    # one pass: q0 wins 1 of its 2 pixels, q1 1 of 3: both dropped, pixels 0-1 void
    seg, info, q2s = panoptic_inference(probs, masks, [True, False], **kw)
    assert seg.tolist() == [[0, 0, 1, 1]] and q2s.tolist() == [0, 0, 1]
    assert [(i["category_id"], i["isthing"]) for i in info] == [(1, False)]
    # repeated: q1 (the best-scoring failure) goes first, then q0 wins both its pixels
    seg, info, q2s = panoptic_inference(probs, masks, [True, False], reassign_dropped=True, **kw)
    assert seg.tolist() == [[1, 1, 2, 2]] and q2s.tolist() == [1, 0, 2]
    assert [(i["category_id"], i["isthing"]) for i in info] == [(0, True), (1, False)]
    # a duplicate mask of lower score wins nothing: dropped, the other kept
    seg, info, q2s = panoptic_inference(
        probs[:2], masks[[1, 1]], [True, False], reassign_dropped=True, **kw
    )
    assert seg.tolist() == [[0, 1, 1, 1]] and q2s.tolist() == [0, 1]


def test_model_classifies_queries_with_their_mask_shape():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    cfg = tiny_cfg(relation=True)
    cfg.MODEL.SPADE.MASK_HEAD.SHAPE_EMBED_SIZE = 8
    model = build_model(cfg).train()
    assert isinstance(model.mask_shape_embed, MaskShapeEmbedding)
    losses = model([make_input(gen, 3), make_input(gen, 2)])
    sum(losses.values()).backward()
    assert model.mask_shape_embed.mlp[-1].weight.grad.abs().sum() > 0
    # a non-zero embedding changes the class logits of every layer, not the relation head's
    # query features
    torch.nn.init.normal_(model.mask_shape_embed.mlp[-1].weight)
    images = model.preprocess_image([make_input(gen, 3)])
    with torch.no_grad():
        with_shape = model.predict(images)
        embed, model.mask_shape_embed = model.mask_shape_embed, None
        without = model.predict(images)
        model.mask_shape_embed = embed
    torch.testing.assert_close(with_shape["query_features"], without["query_features"])
    assert not torch.allclose(with_shape["pred_logits"], without["pred_logits"])
    for a, b in zip(with_shape["aux_outputs"], without["aux_outputs"]):
        assert not torch.allclose(a["pred_logits"], b["pred_logits"])
    assert build_model(tiny_cfg()).mask_shape_embed is None  # off by default


def test_vocabulary_replacement():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    closed = build_model(tiny_cfg())
    with pytest.raises(ValueError, match="closed-set classifier has 5 classes"):
        closed.set_vocabulary(["a", "b"])
    model = build_model(tiny_cfg(open_vocab=True)).eval()
    assert model.test_vocabulary.class_names == tuple(THINGS + STUFF)
    model.set_vocabulary(["disc", "ring", "sky"], ["near"])
    v = model.test_vocabulary
    assert v.is_thing == (True, True, False) and v.novel_classes == (False, True, False)
    assert model.predicate_text_embeddings().shape[0] == 1
    images = model.preprocess_image([make_input(gen, 1)])
    with torch.no_grad():
        assert model.predict(images)["pred_logits"].shape[-1] == 4  # 3 names + no-object
        check_panoptic(model([make_input(gen, 1)])[0], 64, 48, 3)
    model.train()  # training always uses the training vocabulary
    assert model.vocabulary.class_names == tuple(THINGS + STUFF)


def test_text_whitening_is_fitted_on_the_training_vocabulary():
    from spade.modeling.open_vocab import TextWhitening

    cfg = tiny_cfg(relation=True, open_vocab=True)
    cfg.MODEL.SPADE.OPEN_VOCAB.TEXT_WHITENING = 0.2
    cfg.MODEL.SPADE.RELATION.TEXT_WHITENING = 0.1
    model = build_model(cfg)
    class_white = model.classifier.cosine.whitening
    predicate_white = model.relation_head.predicates.cosine.whitening
    expected = TextWhitening(class_white.dim, 0.2).fit(model.text_bank.get(THINGS + STUFF))
    assert torch.allclose(class_white.matrix, expected.matrix)
    expected = TextWhitening(predicate_white.dim, 0.1).fit(
        model.predicate_text_bank.get(PREDICATES)
    )
    assert torch.allclose(predicate_white.mean, expected.mean)
    assert torch.allclose(predicate_white.matrix, expected.matrix)
    # an inference vocabulary is mapped with the training statistics, never refitted
    model.eval().set_vocabulary(["disc", "ring", "sky"], ["near", "on"])
    assert torch.allclose(predicate_white.matrix, expected.matrix)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        result = model([make_input(gen, 3)])[0]
    assert result["relations"]["predicate_scores"].shape[1] == 2
    # off by default: no whitening module
    plain = build_model(tiny_cfg(relation=True, open_vocab=True))
    assert plain.classifier.cosine.whitening is None
    assert plain.relation_head.predicates.cosine.whitening is None


def test_relation_head_plumbing():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    model = build_model(tiny_cfg(relation=True)).train()
    losses = model([make_input(gen, 3), make_input(gen, 0)])
    assert "loss_rel" in losses and "loss_ce" in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None for p in model.relation_head.parameters())
    model.eval()
    with torch.no_grad():
        result = model([make_input(gen, 3)])[0]
    seg_ids = {s["id"] for s in result["panoptic_seg"][1]}
    rel = result["relations"]
    assert rel["triplets"].shape[1] == 3 and rel["predicate_scores"].shape[1] == len(PREDICATES)
    assert set(rel["triplets"][:, :2].flatten().tolist()) <= seg_ids
    assert torch.all(rel["scores"][:-1] >= rel["scores"][1:])


def test_relation_pairs_are_chosen_among_kept_segments():
    def run(kept_only):
        torch.manual_seed(2)
        cfg = tiny_cfg(relation=True)
        cfg.MODEL.SPADE.RELATION.NUM_PAIRS = 2  # 2 of the 8 x 7 query pairs
        cfg.MODEL.SPADE.TEST.OVERLAP_THRESHOLD = 0.0
        cfg.MODEL.SPADE.TEST.PAIRS_FROM_KEPT_SEGMENTS = kept_only
        model = build_model(cfg).eval()
        seen = []
        original = model.relation_head.forward

        def spy(*args, **kwargs):
            seen.append(kwargs.get("pair_mask"))
            return original(*args, **kwargs)

        model.relation_head.forward = spy
        with torch.no_grad():
            result = model([make_input(torch.Generator().manual_seed(4), 3)])[0]
        return result, seen[-1]

    result, mask = run(True)
    kept = {s["id"] for s in result["panoptic_seg"][1]}
    assert len(kept) == 3
    assert mask.shape == (1, 8, 8) and not bool(mask.diagonal(0, 1, 2).any())
    # both selected pairs join two different kept segments, so both become triplets
    triplets = result["relations"]["triplets"]
    assert len(triplets) == 2 and set(triplets[:, :2].flatten().tolist()) <= kept
    assert bool((triplets[:, 0] != triplets[:, 1]).all())
    # the older selection spends both pairs on queries panoptic inference dropped
    result, mask = run(False)
    assert mask is None and len(result["relations"]["triplets"]) == 0


def test_predicates_per_pair_gives_each_pair_several_rows():
    def run(k):
        torch.manual_seed(2)
        cfg = tiny_cfg(relation=True)
        cfg.MODEL.SPADE.TEST.OVERLAP_THRESHOLD = 0.0
        cfg.MODEL.SPADE.TEST.PREDICATES_PER_PAIR = k
        model = build_model(cfg).eval()
        with torch.no_grad():
            return model([make_input(torch.Generator().manual_seed(4), 3)])[0]["relations"]

    one, three = run(1), run(3)
    pairs = [tuple(t) for t in one["triplets"][:, :2].tolist()]
    assert len(pairs) == len(set(pairs)) > 0
    rows = three["triplets"].tolist()
    assert len(rows) == 3 * len(pairs) and len({tuple(r) for r in rows}) == len(rows)
    for pair, first in zip(pairs, one["triplets"].tolist()):
        mine = [r for r in rows if tuple(r[:2]) == pair]
        # the pair's first row is its k = 1 row; its rows carry 3 different predicates
        assert mine[0] == first and len({r[2] for r in mine}) == 3
    # each row's distribution peaks at its own predicate
    assert three["predicate_scores"].argmax(1).tolist() == three["triplets"][:, 2].tolist()
    cfg = tiny_cfg(relation=True)
    cfg.MODEL.SPADE.TEST.PREDICATES_PER_PAIR = 0
    with pytest.raises(ValueError, match="PREDICATES_PER_PAIR"):
        build_model(cfg)


def test_bad_inputs_name_the_image():
    gen = torch.Generator().manual_seed(5)
    model = build_model(tiny_cfg()).train()
    x = make_input(gen, 2)
    del x["instances"]
    with pytest.raises(KeyError, match="img2"):
        model([x])
    x = make_input(gen, 2)
    x["instances"].gt_classes = torch.tensor([0, 7])
    with pytest.raises(ValueError, match=r"img2.*outside \[0, 5\)"):
        model([x])
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("spade_test_unregistered",)
    with pytest.raises(ValueError, match="spade_test_unregistered"):
        build_model(cfg)
