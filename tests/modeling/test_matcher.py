"""Hungarian matcher: hand-made costs, known assignments, empty ground truth, bad input."""

import math

import pytest
import torch

from spade.modeling.matcher import (
    HungarianMatcher,
    assignment_from_cost,
    batch_bce_cost,
    batch_dice_cost,
)


def test_assignment_on_hand_made_costs():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = assignment_from_cost(cost)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]  # total 1 + 2 + 2 = 5
    # more queries than targets: the cheapest queries get the targets
    rows, cols = assignment_from_cost(
        torch.tensor([[9.0, 9.0], [1.0, 5.0], [5.0, 1.0], [2.0, 2.0]])
    )
    assert rows.tolist() == [1, 2] and cols.tolist() == [0, 1]


def test_assignment_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        assignment_from_cost(torch.tensor([[float("nan"), 1.0]]))


def test_pairwise_costs_hand_computed():
    logits = torch.zeros(1, 2)  # probability 0.5 everywhere
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(batch_bce_cost(logits, targets), torch.full((1, 2), math.log(2)))
    # dice: 1 - (2 * sum(p t) + 1) / (sum p + sum t + 1)
    expected = torch.tensor([[1 - 2 / 3, 1 - 3 / 4]])
    torch.testing.assert_close(batch_dice_cost(logits, targets), expected)


def _masks(generator, n, size=16):
    return torch.rand(n, size, size, generator=generator) > 0.5


def test_matcher_recovers_a_known_permutation():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    gt = _masks(g, 3)
    labels = torch.tensor([2, 0, 1])
    # query q predicts ground truth perm[q]; queries 3 and 4 predict nothing
    perm = [1, 2, 0]
    pred_masks = torch.full((1, 5, 16, 16), -10.0)
    logits = torch.zeros(1, 5, 4)
    logits[0, :, 3] = 5.0
    for q, t in enumerate(perm):
        pred_masks[0, q] = gt[t].float() * 20 - 10
        logits[0, q] = 0.0
        logits[0, q, labels[t]] = 5.0
    matcher = HungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5, num_points=200)
    [(q_idx, t_idx)] = matcher(
        {"pred_logits": logits, "pred_masks": pred_masks}, [{"labels": labels, "masks": gt}]
    )
    assert q_idx.tolist() == [0, 1, 2] and t_idx.tolist() == perm


def test_matcher_empty_ground_truth_and_bad_input():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.zeros(2, 4, 3), "pred_masks": torch.zeros(2, 4, 8, 8)}
    empty = {
        "labels": torch.zeros(0, dtype=torch.long),
        "masks": torch.zeros(0, 8, 8, dtype=torch.bool),
    }
    one = {"labels": torch.tensor([1]), "masks": torch.ones(1, 8, 8, dtype=torch.bool)}
    result = HungarianMatcher(num_points=10)(outputs, [empty, one])
    assert result[0][0].numel() == 0 and result[0][1].numel() == 0
    assert len(result[1][0]) == 1 and result[1][1].tolist() == [0]
    with pytest.raises(ValueError, match="outside"):
        HungarianMatcher(num_points=10)(
            outputs, [empty, {"labels": torch.tensor([2]), "masks": one["masks"]}]
        )
    with pytest.raises(ValueError, match="1 labels but 2 masks"):
        HungarianMatcher(num_points=10)(
            outputs,
            [empty, {"labels": torch.tensor([0]), "masks": torch.ones(2, 8, 8, dtype=torch.bool)}],
        )
    with pytest.raises(ValueError, match="2 predictions, 1 targets"):
        HungarianMatcher(num_points=10)(outputs, [empty])
    with pytest.raises(ValueError, match="all costs"):
        HungarianMatcher(0, 0, 0)
