"""RGTRelationHead / PairMLPRelationHead built from configs: training, inference, switches."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

from spade.config import add_spade_config
from spade.modeling.relation import PairMLPRelationHead, RGTRelationHead, build_relation_head
from spade.modeling.relation.pairs import select_pairs

B, Q, K, C, H, TEXT = 2, 5, 3, 16, 16, 8


def _cfg(**relation):
    cfg = get_cfg()
    add_spade_config(cfg)
    s = cfg.MODEL.SPADE
    s.MASK_HEAD.HIDDEN_DIM = C
    s.PIXEL_DECODER.MASK_DIM = 8
    r = s.RELATION
    r.HIDDEN_DIM, r.NHEADS, r.DIM_FEEDFORWARD, r.NUM_PAIRS = 16, 2, 32, 6
    r.GRAPH_RESOLUTION, r.TEXT_DIM = 8, TEXT
    for key, value in relation.items():
        setattr(r, key, value)
    return cfg


def _head(seed=0, **relation):
    torch.manual_seed(seed)
    return build_relation_head(_cfg(**relation))


def _inputs(seed=0, q=Q, num_predicates=4):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        query_features=torch.randn(B, q, C, generator=gen),
        mask_logits=torch.randn(B, q, H, H, generator=gen) * 4,
        class_probs=torch.randn(B, q, K + 1, generator=gen).softmax(-1),
        features={"mask_features": torch.randn(B, 8, H, H, generator=gen)},
        predicate_text=F.normalize(torch.randn(num_predicates, TEXT, generator=gen), dim=-1),
    )


def _targets():
    targets = [
        {"gt_relations": torch.tensor([[0, 1, 2], [1, 2, 0], [0, 1, 3]])},
        {"gt_relations": torch.zeros(0, 3, dtype=torch.long)},
    ]
    matches = [
        (torch.tensor([4, 0, 2]), torch.tensor([0, 1, 2])),
        (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)),
    ]
    return targets, matches


def test_training_losses_backward_including_empty_image():
    head = _head().train()
    targets, matches = _targets()
    losses = head(**_inputs(), targets=targets, matches=matches)
    assert set(losses) == {"loss_rel", "loss_rqc"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert head.input_proj.weight.grad.abs().sum() > 0
    assert head.subject_proj.weight.grad.abs().sum() > 0  # L_rqc trains the pair selection
    assert head.predicates.cosine.background.grad.abs().sum() > 0


def test_no_relations_anywhere_still_trains_no_relation():
    head = _head().train()
    empty = [{"gt_relations": torch.zeros(0, 3, dtype=torch.long)}] * B
    no_match = [(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))] * B
    losses = head(**_inputs(), targets=empty, matches=no_match)
    assert losses["loss_rqc"].item() == 0.0 and losses["loss_rel"] > 0
    sum(losses.values()).backward()


def _spy_on_scored_pairs(monkeypatch, head):
    """The pairs [M, 2] each predicate_logits call of ``head`` scores, one list per call."""
    seen = []
    original = head.predicate_logits

    def spy(q, pairs, *args):
        seen.append(pairs.tolist())
        return original(q, pairs, *args)

    monkeypatch.setattr(head, "predicate_logits", spy)
    return seen


def test_gt_pairs_outside_top_m_are_trained(monkeypatch):
    head = _head(NUM_PAIRS=1).train()
    seen = _spy_on_scored_pairs(monkeypatch, head)
    targets, matches = _targets()
    head(**_inputs(), targets=targets, matches=matches)
    assert len(seen[0]) <= 3 and [4, 0] in seen[0] and [0, 2] in seen[0]  # GT pairs in queries
    assert len(seen[1]) == 1  # empty image: only the selected pair


def test_matched_pairs_are_trained_as_no_relation_when_asked(monkeypatch):
    head = _head(NUM_PAIRS=1, TRAIN_MATCHED_PAIRS=True).train()
    seen = _spy_on_scored_pairs(monkeypatch, head)
    targets, matches = _targets()
    head(**_inputs(), targets=targets, matches=matches)
    # matched queries 4, 0, 2: all 6 ordered pairs are rows, the selected pair as well
    ordered = {(a, b) for a in (4, 0, 2) for b in (4, 0, 2) if a != b}
    assert ordered <= {tuple(p) for p in seen[0]} and len(seen[0]) <= 7
    assert len({tuple(p) for p in seen[0]}) == len(seen[0])  # no pair twice
    assert len(seen[1]) == 1  # nothing matched: only the selected pair


def test_inference_output_format_and_vocabulary_swap():
    head = _head().eval()
    with torch.no_grad():
        out4 = head(**_inputs(num_predicates=4))
        out7 = head(**_inputs(num_predicates=7))
    assert len(out4) == B
    for image in out4:
        assert image["pairs"].shape == (6, 2) and image["pairs"].dtype == torch.long
        assert (image["pairs"][:, 0] != image["pairs"][:, 1]).all()
        assert image["pair_scores"].shape == (6,) and image["predicate_scores"].shape == (6, 4)
        assert (image["predicate_scores"].sum(-1) <= 1 + 1e-5).all()
    assert out7[0]["predicate_scores"].shape == (6, 7)


def test_pair_scores_are_subject_times_object_score():
    head = _head().eval()
    inputs = _inputs()
    with torch.no_grad():
        out = head(**inputs)[0]
    score = inputs["class_probs"][0, :, :-1].max(-1).values
    expected = score[out["pairs"][:, 0]] * score[out["pairs"][:, 1]]
    assert torch.allclose(out["pair_scores"], expected)


def test_clip_branch_is_fused_only_when_enabled():
    gen = torch.Generator().manual_seed(3)
    clip = torch.randn(B, TEXT, 4, 4, generator=gen)
    outs = {}
    for flag in (True, False):
        head = _head(USE_CLIP_BRANCH=flag).eval()
        with torch.no_grad():
            outs[flag] = head(**_inputs(), clip_features=clip)[0]["predicate_scores"]
            plain = head(**_inputs())[0]["predicate_scores"]
        assert torch.allclose(outs[flag], plain) != flag
    assert torch.isfinite(outs[True]).all()


def test_predicate_fusion_exponents_override_open_vocab_ones():
    """RELATION.FUSION_ALPHA / _BETA = 1 keep the diffusion/RGT branch alone (CLIP fed but
    weighted 0); -1 inherits OPEN_VOCAB's 0.34, which does fuse."""
    gen = torch.Generator().manual_seed(3)
    clip = torch.randn(B, TEXT, 4, 4, generator=gen)
    only_rgt = _head(FUSION_ALPHA=1.0, FUSION_BETA=1.0).eval()
    inherit = _head().eval()
    with torch.no_grad():
        fused = only_rgt(**_inputs(), clip_features=clip)[0]["predicate_scores"]
        plain = only_rgt(**_inputs())[0]["predicate_scores"]
        inherited = inherit(**_inputs(), clip_features=clip)[0]["predicate_scores"]
    assert torch.allclose(fused, plain, atol=1e-6)
    assert not torch.allclose(inherited, fused)  # same seed, same weights: only fusion differs


def test_chunked_scoring_equals_unchunked():
    big, small = _head(PAIR_CHUNK=4096).eval(), _head(PAIR_CHUNK=4).eval()
    with torch.no_grad():
        a, b = big(**_inputs())[1], small(**_inputs())[1]
    assert torch.equal(a["pairs"], b["pairs"])
    assert torch.allclose(a["predicate_scores"], b["predicate_scores"], atol=1e-6)


def test_ablation_switches_and_baseline():
    head = _head(USE_NEIGHBOUR_ATTENTION=False, USE_LOCAL_GCN=False)
    assert len(head.global_layers) == 2 and head.global_layers[0].neighbour_attention is None
    assert head.local_gcn is None
    head = _head(USE_NEIGHBOUR_ATTENTION=False, USE_NON_NEIGHBOUR_ATTENTION=False)
    assert len(head.global_layers) == 0 and head.local_gcn is not None
    head = _head(BASELINE_PAIR_MLP=True)
    assert len(head.global_layers) == 0 and head.local_gcn is None
    baseline = _head(NAME="PairMLPRelationHead")
    assert isinstance(baseline, PairMLPRelationHead) and baseline.baseline_pair_mlp
    assert _head(GRAPH_MODE="knn").graph_args["mode"] == "knn"
    head = _head(USE_RQC_LOSS=False).train()
    targets, matches = _targets()
    assert set(head(**_inputs(), targets=targets, matches=matches)) == {"loss_rel"}
    # every variant runs
    for variant in (baseline, _head(GRAPH_MODE="knn")):
        with torch.no_grad():
            assert variant.eval()(**_inputs())[0]["predicate_scores"].shape == (6, 4)


def test_closed_set_classifier_without_text():
    cfg = _cfg(NUM_PREDICATES=5)
    cfg.MODEL.SPADE.MASK_HEAD.OPEN_VOCAB = False
    torch.manual_seed(0)
    head = RGTRelationHead(cfg).eval()
    assert head.predicates.cosine is None and head.predicates.text_proj is None
    inputs = _inputs()
    inputs["predicate_text"] = None
    with torch.no_grad():
        assert head(**inputs)[0]["predicate_scores"].shape == (6, 5)
    with pytest.raises(ValueError, match="closed-set"):
        head(**_inputs())


def test_single_query_gives_no_pairs():
    head = _head().train()
    targets = [{"gt_relations": torch.zeros(0, 3, dtype=torch.long)}] * B
    matches = [(torch.tensor([0]), torch.tensor([0]))] * B
    losses = head(**_inputs(q=1), targets=targets, matches=matches)
    assert losses["loss_rel"].item() == 0.0
    sum(losses.values()).backward()
    with torch.no_grad():
        out = head.eval()(**_inputs(q=1))
    assert out[0]["pairs"].shape == (0, 2) and out[0]["predicate_scores"].shape == (0, 4)


def test_select_pairs_excludes_self_and_ranks():
    ranking = torch.tensor([[9.0, 1.0, 3.0], [2.0, 9.0, 0.0], [5.0, 4.0, 9.0]])
    assert select_pairs(ranking, 3).tolist() == [[2, 0], [2, 1], [0, 2]]
    assert len(select_pairs(ranking, 100)) == 6


def test_bad_inputs_raise():
    head = _head().train()
    targets, matches = _targets()
    with pytest.raises(ValueError, match="targets"):
        head(**_inputs())
    bad = [{"gt_relations": torch.tensor([[0, 1, 4]])}, targets[1]]  # predicate 4 with P = 4
    with pytest.raises(ValueError, match=r"targets\[0\].*predicate index 4"):
        head(**_inputs(), targets=bad, matches=matches)
    inputs = _inputs()
    inputs["features"] = {"res2": inputs["features"]["mask_features"]}
    with pytest.raises(KeyError, match="POOL_FEATURE"):
        head(**inputs, targets=targets, matches=matches)
    inputs = _inputs()
    inputs["predicate_text"] = torch.randn(4, TEXT + 1)
    with pytest.raises(ValueError, match="predicate_text"):
        head(**inputs, targets=targets, matches=matches)
    inputs = _inputs()
    inputs["mask_logits"] = inputs["mask_logits"][:, :3]
    with pytest.raises(ValueError, match="mask_logits"):
        head(**inputs, targets=targets, matches=matches)
    cfg = _cfg()
    cfg.MODEL.SPADE.MASK_HEAD.OPEN_VOCAB = False
    with pytest.raises(ValueError, match="NUM_PREDICATES"):
        RGTRelationHead(cfg)


def test_predicate_classifier_fusion_hand_value_and_text_checks():
    from spade.modeling.relation.predicates import PredicateClassifier

    torch.manual_seed(0)
    clf = PredicateClassifier(
        16,
        text_dim=TEXT,
        num_predicates=0,
        logit_scale_init=2.659,
        clip_temperature=100.0,
        fusion_alpha=0.5,
        fusion_beta=0.5,
    )
    fused = clf.fuse_clip(torch.tensor([[0.2, 0.3, 0.5]]), torch.tensor([[0.5, 0.5]]))
    a, b = (0.2 * 0.5) ** 0.5, (0.3 * 0.5) ** 0.5  # renormalised to 1 - p(no relation) = 0.5
    assert torch.allclose(fused, torch.tensor([[0.5 * a / (a + b), 0.5 * b / (a + b), 0.5]]))
    with pytest.raises(ValueError, match="closed-set classifier"):
        clf.check_text(None)
    with pytest.raises(ValueError, match="OPEN_VOCAB"):
        PredicateClassifier(
            16,
            text_dim=0,
            num_predicates=0,
            logit_scale_init=2.659,
            clip_temperature=100.0,
            fusion_alpha=0.5,
            fusion_beta=0.5,
        )


def test_pair_mask_restricts_the_selected_pairs_at_inference():
    head = _head(NUM_PAIRS=3).eval()
    inputs = _inputs()
    with torch.no_grad():
        free = head(**inputs)
    mask = torch.zeros(B, Q, Q, dtype=torch.bool)
    mask[0, 3, 4] = mask[0, 4, 3] = True  # image 0: only queries 3 and 4, both ways
    mask[1] = True  # image 1: every pair
    with torch.no_grad():
        restricted = head(**inputs, pair_mask=mask)
    # the allowed pairs come first, in the head's own order; the rest of M is filled after them
    top = {tuple(p) for p in restricted[0]["pairs"][:2].tolist()}
    assert top == {(3, 4), (4, 3)}
    assert torch.equal(restricted[1]["pairs"], free[1]["pairs"])  # all allowed: unchanged
    # the scores of a pair do not depend on which other pairs were selected
    for b in range(B):
        for k, pair in enumerate(restricted[b]["pairs"].tolist()):
            hits = (free[b]["pairs"] == torch.tensor(pair)).all(dim=1).nonzero()
            if len(hits):
                j = int(hits[0])
                assert torch.allclose(
                    restricted[b]["predicate_scores"][k], free[b]["predicate_scores"][j]
                )
    with pytest.raises(ValueError, match=r"pair_mask \(2, 5, 4\) must be \[B, Q, Q\]"):
        head(**inputs, pair_mask=mask[:, :, :4])
