"""Set criterion: hand-computed losses, empty ground truth, deep supervision weights, gradients."""

import math

import pytest
import torch

from spade.modeling.criterion import SetCriterion, dice_loss, sigmoid_bce_loss
from spade.modeling.matcher import HungarianMatcher


def _criterion(num_aux=0, **kw):
    return SetCriterion(
        matcher=HungarianMatcher(num_points=64), num_points=64, num_aux_outputs=num_aux, **kw
    )


def _empty(size=8):
    return {
        "labels": torch.zeros(0, dtype=torch.long),
        "masks": torch.zeros(0, size, size, dtype=torch.bool),
    }


def test_point_losses_hand_computed():
    logits = torch.zeros(2, 4)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert sigmoid_bce_loss(logits, targets, 2.0).item() == pytest.approx(math.log(2))
    # dice per mask: 1 - (2*1 + 1) / (2 + 2 + 1) = 0.4 and 1 - (2*2 + 1) / (2 + 4 + 1) = 2/7
    assert dice_loss(logits, targets, 1.0).item() == pytest.approx(0.4 + 2 / 7)


def test_empty_ground_truth():
    torch.manual_seed(0)
    logits = torch.zeros(1, 3, 5, requires_grad=True)  # K = 4 classes + no-object
    masks = torch.randn(1, 3, 4, 4, requires_grad=True)
    losses, indices = _criterion(class_weight=2.0)(
        {"pred_logits": logits, "pred_masks": masks}, [_empty()]
    )
    # all queries target no-object; uniform logits: CE = log(5), weighted by class_weight 2
    assert losses["loss_ce"].item() == pytest.approx(2 * math.log(5), rel=1e-6)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    assert indices[0][0].numel() == 0
    sum(losses.values()).backward()
    assert masks.grad is not None and masks.grad.abs().sum() == 0  # in the graph, zero gradient
    assert logits.grad[0, :, 4].lt(0).all()  # pushes every query towards no-object


def test_perfect_prediction_has_small_losses_and_no_object_weight():
    torch.manual_seed(0)
    gt = torch.ones(2, 8, 8, dtype=torch.bool)  # no boundary: point samples are exact
    pred_masks = torch.full((1, 3, 8, 8), -4.0)
    pred_masks[0, :2] = 4.0  # moderate logits: border samples are blurred towards 0 on both sides
    logits = torch.full((1, 3, 4), -30.0)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 3] = 30.0
    targets = [{"labels": torch.tensor([1, 2]), "masks": gt}]
    losses, indices = _criterion()({"pred_logits": logits, "pred_masks": pred_masks}, targets)
    assert indices[0][0].tolist() == [0, 1] and indices[0][1].tolist() == [0, 1]
    assert losses["loss_ce"].item() < 1e-6
    inverted = _criterion()({"pred_logits": logits, "pred_masks": -pred_masks}, targets)[0]
    for name in ("loss_mask", "loss_dice"):  # border samples blur towards 0: not exactly 0
        assert losses[name].item() < 0.5 * inverted[name].item()
    # a wrong no-object query costs little with no_object_weight 0.1: CE = weighted mean
    logits[0, 2, 3], logits[0, 2, 0] = -30.0, 30.0
    losses = _criterion(no_object_weight=0.1)(
        {"pred_logits": logits, "pred_masks": pred_masks}, targets
    )[0]
    assert losses["loss_ce"].item() == pytest.approx(2 * 0.1 * 60 / 2.1, rel=1e-4)


def test_deep_supervision_weight_dict_and_aux_losses():
    torch.manual_seed(0)
    crit = _criterion(num_aux=2, class_weight=2.0, mask_weight=5.0, dice_weight=5.0)
    assert crit.weight_dict == {
        "loss_ce": 2.0,
        "loss_mask": 5.0,
        "loss_dice": 5.0,
        "loss_ce_0": 2.0,
        "loss_mask_0": 5.0,
        "loss_dice_0": 5.0,
        "loss_ce_1": 2.0,
        "loss_mask_1": 5.0,
        "loss_dice_1": 5.0,
    }
    out = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": torch.zeros(1, 2, 4, 4)}
    outputs = {**out, "aux_outputs": [dict(out), dict(out)]}
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}]
    losses, _ = crit(outputs, targets)
    assert set(losses) == set(crit.weight_dict)
    assert losses["loss_ce_1"].item() == pytest.approx(losses["loss_ce"].item())
    with pytest.raises(ValueError, match="fewer than 3"):
        crit({**out, "aux_outputs": [dict(out)] * 3}, targets)
    with pytest.raises(ValueError, match="1 predictions, 2 targets"):
        crit(out, targets * 2)


def test_void_queries_leave_the_class_loss():
    """With VOID_QUERY_SHARE 0.5 an unmatched query whose mask lies on void pixels (an unlabelled
    novel object) is left out of the weighted cross-entropy; matched queries and queries elsewhere
    keep theirs. Q = 3, K = 2 (+ no-object), one target on the left half, void in the top right."""
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, :2] = True
    void = torch.zeros(4, 4, dtype=torch.bool)
    void[:2, 2:] = True
    pred = torch.full((1, 3, 4, 4), -20.0)
    pred[0, 0][mask] = 20.0  # query 0 fits the target: matched
    pred[0, 1][void] = 20.0  # query 1 covers the void region
    pred[0, 2][2:, 2:] = 20.0  # query 2 covers the labelled bottom right
    logits = torch.tensor([[[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    target = {"labels": torch.tensor([0]), "masks": mask[None], "void": void}
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    ce = [
        -torch.log_softmax(logits[0, q], -1)[c].item() for q, c in ((0, 0), (1, 2), (2, 2))
    ]  # query 0 -> class 0, queries 1, 2 -> no-object (index 2, weight 0.1)
    crit = _criterion(void_query_share=0.5)
    assert crit.void_queries(pred, [target], indices).tolist() == [[False, True, False]]
    loss = crit.loss_labels(logits, [target], indices, pred).item()
    assert loss == pytest.approx((ce[0] + 0.1 * ce[2]) / 1.1, rel=1e-5)
    # off (0), or without masks: Mask2Former's loss, every unmatched query targets no-object
    full = (ce[0] + 0.1 * ce[1] + 0.1 * ce[2]) / 1.2
    assert _criterion().loss_labels(logits, [target], indices, pred).item() == pytest.approx(
        full, rel=1e-5
    )
    assert crit.loss_labels(logits, [target], indices).item() == pytest.approx(full, rel=1e-5)
    # a matched query on void keeps its class; an image without void drops nothing
    assert not crit.void_queries(pred, [target], [(torch.tensor([1]), torch.tensor([0]))])[0, 1]
    no_void = dict(target, void=torch.zeros(4, 4, dtype=torch.bool))
    assert not crit.void_queries(pred, [no_void], indices).any()
    with pytest.raises(ValueError, match="VOID_QUERY_SHARE"):
        _criterion(void_query_share=1.5)


def test_void_share_is_the_mask_mass_on_void():
    """Half of query 0's sigmoid mass lies on void: dropped at share 0.5, kept at 0.6."""
    void = torch.zeros(2, 2, dtype=torch.bool)
    void[0] = True
    pred = torch.full((1, 1, 2, 2), 20.0)  # the whole image
    target = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 2, 2)}
    target["void"] = void
    none = [(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))]
    assert _criterion(void_query_share=0.5).void_queries(pred, [target], none).tolist() == [[True]]
    assert _criterion(void_query_share=0.6).void_queries(pred, [target], none).tolist() == [[False]]
