"""Per-class query diagnosis: records by hand, the summary, bad input, and the capture of a real
model's query outputs."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from test_meta_arch import make_input, tiny_cfg

from spade.evaluation.query_diagnosis import (
    capture_queries,
    diagnose_image,
    summarize_diagnosis,
)


def _case():
    """4 x 4 image; ground truth A (class 0) the left half, B (class 1) the top-right quarter,
    C (class 1) the bottom-right quarter. Queries: q0 = A, q1 = B plus one pixel of C (IoU 0.8),
    q2 empty. K = 2 classes + no object (index 2)."""
    a = np.zeros((4, 4), bool)
    a[:, :2] = True
    b = np.zeros((4, 4), bool)
    b[:2, 2:] = True
    c = np.zeros((4, 4), bool)
    c[2:, 2:] = True
    logits = torch.full((3, 4, 4), -5.0)
    logits[0][torch.from_numpy(a)] = 5.0
    logits[1][torch.from_numpy(b)] = 5.0
    logits[1, 2, 2] = 5.0
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.2, 0.6], [0.1, 0.5, 0.4]])
    seg = np.zeros((4, 4), np.int32)
    seg[a] = 1  # final segment 1: A, named class 0
    seg[c] = 2  # final segment 2: C, named class 0 (wrong)
    info = [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 0}]
    return np.stack([a, b, c]), [0, 1, 1], probs, logits, seg, info


def test_records_and_summary_by_hand():
    gt, classes, probs, logits, seg, info = _case()
    records = diagnose_image(gt, classes, probs, logits, seg, info)
    assert [r["class"] for r in records] == [0, 1, 1]
    # C meets only q1: 1 shared pixel, union 5 + 4 - 1 = 8
    assert [r["proposal_iou"] for r in records] == pytest.approx([1.0, 0.8, 0.125])
    # A's best query is q0 (class 0); B's is q1 (no object); C's is q1 too
    assert [r["query_class"] for r in records] == [0, 2, 2]
    assert [r["final_class"] for r in records] == [0, None, 0]
    summary = summarize_diagnosis(records, ["disc", "box"])
    assert summary["disc"] == {
        "count": 1,
        "proposal_recall": 1.0,
        "no_object": 0.0,
        "named_right": 1,
        "unmatched": 0,
        "named_as": None,
    }
    assert summary["box"] == {
        "count": 2,
        "proposal_recall": 0.5,
        "no_object": 1.0,
        "named_right": 0,
        "unmatched": 1,
        "named_as": "disc",
    }
    # a class without ground truth is left out; at IoU 0.9 B's proposal no longer counts
    assert list(summarize_diagnosis(records, ["disc", "box", "star"])) == ["disc", "box"]
    assert (
        summarize_diagnosis(records, ["disc", "box"], iou_threshold=0.9)["box"]["proposal_recall"]
        == 0.0
    )


def test_empty_ground_truth_and_no_output():
    _, _, probs, logits, _, _ = _case()
    empty = np.zeros((0, 4, 4), bool)
    assert diagnose_image(empty, [], probs, logits, np.zeros((4, 4)), []) == []
    assert summarize_diagnosis([], ["disc"]) == {}
    gt, classes, _, _, seg, _ = _case()
    # no final segment at all: every thing is unmatched
    records = diagnose_image(gt, classes, probs, logits, np.zeros((4, 4)), [])
    assert all(r["final_class"] is None for r in records)


def test_bad_input_names_the_image():
    gt, classes, probs, logits, seg, info = _case()
    with pytest.raises(ValueError, match="image img7: .* differ in size"):
        diagnose_image(gt, classes, probs, logits[:, :3], seg, info, where="img7")
    with pytest.raises(ValueError, match="image img7: 3 masks but 2 classes"):
        diagnose_image(gt, classes[:2], probs, logits, seg, info, where="img7")
    with pytest.raises(ValueError, match="image img7: 2 query classes but 3 masks"):
        diagnose_image(gt, classes, probs[:2], logits, seg, info, where="img7")


def test_capture_queries_records_each_image_and_restores_the_model():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    gen = torch.Generator().manual_seed(0)
    inputs = [make_input(gen, 3), make_input(gen, 2, size=(48, 64))]
    with torch.no_grad(), capture_queries(model) as captured:
        outputs = model(inputs)
    assert len(captured) == 2
    for (probs, masks), x, out in zip(captured, inputs, outputs):
        q = probs.shape[0]
        assert probs.shape == (q, len(model.vocabulary.class_names) + 1)
        assert torch.allclose(probs.sum(-1), torch.ones(q), atol=1e-4)
        assert masks.shape == (q, x["height"], x["width"])
        assert out["panoptic_seg"][0].shape == (x["height"], x["width"])
    assert "panoptic_inference" not in vars(model)  # the class's method again
    with torch.no_grad():
        model(inputs[:1])
    assert len(captured) == 2  # nothing recorded after the block
