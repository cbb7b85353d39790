"""Relation targets follow the matcher; L_rel and L_rqc on hand-computed cases."""

import math

import pytest
import torch

from spade.modeling.relation.relation_criterion import (
    RelationCriterion,
    add_target_pairs,
    matched_pairs,
    predicate_targets,
    relation_loss,
    relation_targets,
    rqc_loss,
)


def test_targets_follow_the_matcher_assignment():
    gt_relations = torch.tensor([[0, 1, 3], [2, 0, 1], [1, 3, 0]])
    # instance 0 -> query 2, 1 -> 5, 2 -> 7; instance 3 is unmatched
    query_idx, gt_idx = torch.tensor([5, 2, 7]), torch.tensor([1, 0, 2])
    pairs, predicates = relation_targets(gt_relations, query_idx, gt_idx, num_predicates=4)
    assert pairs.tolist() == [[2, 5], [7, 2]]
    assert predicates.tolist() == [3, 1]


def test_empty_relations_and_empty_matches():
    pairs, predicates = relation_targets(torch.zeros(0, 3), torch.zeros(0), torch.zeros(0), 4)
    assert pairs.shape == (0, 2) and predicates.shape == (0,)
    pairs, _ = relation_targets(torch.tensor([[0, 1, 0]]), torch.zeros(0), torch.zeros(0), 4)
    assert pairs.shape == (0, 2)


def test_predicate_outside_training_vocabulary_raises():
    with pytest.raises(ValueError, match=r"targets\[1\].*predicate index 4.*size 4"):
        relation_targets(
            torch.tensor([[0, 1, 4]]), torch.tensor([0, 1]), torch.tensor([0, 1]), 4, 1
        )
    with pytest.raises(ValueError, match=r"\[R, 3\]"):
        relation_targets(torch.tensor([[0, 1]]), torch.tensor([0]), torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="negative"):
        relation_targets(torch.tensor([[0, -1, 1]]), torch.tensor([0]), torch.tensor([0]), 4)


def test_unselected_gt_pairs_are_added():
    selected = torch.tensor([[0, 1], [1, 0]])
    gt = torch.tensor([[1, 0], [2, 3], [2, 3]])
    assert add_target_pairs(selected, gt, 4).tolist() == [[0, 1], [1, 0], [2, 3]]
    assert add_target_pairs(selected, torch.zeros(0, 2, dtype=torch.long), 4).tolist() == [
        [0, 1],
        [1, 0],
    ]


def test_matched_pairs_every_ordered_pair():
    assert matched_pairs(torch.tensor([4, 0, 2])).tolist() == [
        [4, 0],
        [4, 2],
        [0, 4],
        [0, 2],
        [2, 4],
        [2, 0],
    ]
    assert matched_pairs(torch.tensor([3])).shape == (0, 2)
    assert matched_pairs(torch.zeros(0, dtype=torch.long)).shape == (0, 2)


def test_predicate_targets_soft_labels_and_no_relation():
    pairs = torch.tensor([[0, 1], [1, 0], [2, 0]])
    gt_pairs = torch.tensor([[0, 1], [0, 1], [2, 0], [2, 0]])
    gt_predicates = torch.tensor([0, 2, 1, 1])  # (0, 1) has two predicates; (2, 0) a duplicate
    rows = predicate_targets(pairs, gt_pairs, gt_predicates, 3)
    expected = [[0.5, 0, 0.5, 0], [0, 0, 0, 1], [0, 1, 0, 0]]
    assert torch.allclose(rows, torch.tensor(expected))
    empty = predicate_targets(
        pairs, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3
    )
    assert empty[:, 3].tolist() == [1, 1, 1]


def test_relation_loss_hand_values():
    logits = torch.zeros(2, 3)
    targets = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    assert relation_loss(logits, targets, 0.1).item() == pytest.approx(math.log(3), rel=1e-6)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    a = -math.log(math.e**2 / (math.e**2 + 2))  # positive row
    b = -math.log(math.e / (math.e + 2))  # no-relation row, weight 0.1
    assert relation_loss(logits, targets, 0.1).item() == pytest.approx(
        (a + 0.1 * b) / 1.1, rel=1e-6
    )
    with pytest.raises(ValueError):
        relation_loss(logits, targets[:1], 0.1)


def test_rqc_loss_hand_value_and_lower_when_gt_ranked_first():
    s = torch.tensor(
        [[0.0, 2.0], [0.0, 0.0]]
    )  # pair (0, 1) logit 2, the only negative (1, 0) logit 0
    loss, n = rqc_loss(s, torch.tensor([[0, 1]]))
    assert n == 1 and loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 5, generator=gen)
    gt = torch.tensor([[0, 3], [4, 1]])
    first, last = base.clone(), base.clone()
    first[0, 3] = first[4, 1] = base.max() + 1
    last[0, 3] = last[4, 1] = base.min() - 1
    assert rqc_loss(first, gt)[0] < rqc_loss(base, gt)[0] < rqc_loss(last, gt)[0]
    empty, n = rqc_loss(base.requires_grad_(True), torch.zeros(0, 2, dtype=torch.long))
    assert n == 0 and empty.item() == 0.0
    empty.backward()  # keeps the graph


def test_criterion_weights_and_switch():
    logits = [torch.zeros(2, 3, requires_grad=True), torch.zeros(0, 3, requires_grad=True)]
    rows = [torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), torch.zeros(0, 3)]
    sel = torch.tensor([[[0.0, 2.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    positives = [torch.tensor([[0, 1]]), torch.zeros(0, 2, dtype=torch.long)]
    weights = dict(rel_weight=2.0, rqc_weight=0.5, no_relation_weight=0.1)
    crit = RelationCriterion(**weights, use_rqc_loss=True)
    losses = crit(logits, rows, sel, positives)
    assert losses["loss_rel"].item() == pytest.approx(2 * math.log(3), rel=1e-6)
    assert losses["loss_rqc"].item() == pytest.approx(0.5 * math.log(1 + math.exp(-2)), rel=1e-6)
    sum(losses.values()).backward()
    assert sel.grad is not None and logits[0].grad is not None
    off = RelationCriterion(**weights, use_rqc_loss=False)(logits, rows, sel, positives)
    assert set(off) == {"loss_rel"}
