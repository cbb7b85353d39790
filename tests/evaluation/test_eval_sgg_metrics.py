"""Matching core: IoU matrices, protocols, ranks, aggregation edge cases."""

import math

import numpy as np
import pytest

from spade.evaluation.recall import summarize
from spade.evaluation.sgg_metrics import (
    NO_MATCH,
    GroundTruthGraph,
    PredictedGraph,
    box_iou,
    canonical_rows,
    mask_boxes,
    score_image,
    segment_iou,
)


def test_segment_iou_equals_pairwise_masks():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 6, size=(23, 17)) * 7  # ids 0 (void), 7, 14, ... 35
    gt = rng.integers(0, 4, size=(23, 17)) + 100  # ids 100..103, no void
    pred_ids = np.array([7, 14, 21, 28, 35, 999])  # 999: listed but absent (empty mask)
    gt_ids = np.array([103, 100, 101, 102])
    iou = segment_iou(pred, pred_ids, gt, gt_ids)
    for i, p in enumerate(pred_ids):
        for j, g in enumerate(gt_ids):
            a, b = pred == p, gt == g
            union = (a | b).sum()
            expect = (a & b).sum() / union if union else 0.0
            assert iou[i, j] == expect


def test_box_iou_hand_computed():
    iou = box_iou(
        np.array([[0, 0, 10, 10], [0, 0, 10, 5]]), np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    )
    np.testing.assert_array_equal(iou, np.array([[1.0, 0.0], [0.5, 0.0]], dtype=np.float32))


def test_mask_boxes_tight_pixel_edges():
    seg = np.zeros((6, 8), dtype=np.int64)
    seg[1:3, 2:5] = 4
    boxes = mask_boxes(seg, np.array([4, 9]))
    np.testing.assert_array_equal(boxes, [[2, 1, 5, 3], [0, 0, 0, 0]])


def _gt():
    seg = np.zeros((4, 12), dtype=np.int64)
    seg[:, :4], seg[:, 4:8], seg[:, 8:] = 1, 2, 3
    return GroundTruthGraph(
        image_id="x",
        height=4,
        width=12,
        labels=np.array([0, 1, 2]),
        relations=np.array([[0, 1, 0], [1, 2, 1]]),
        segment_ids=np.array([1, 2, 3]),
        seg=seg,
    )


def test_duplicate_masks_inflate_multi_but_not_single():
    gt = _gt()
    gt.labels = np.array([0, 1, 1])  # segments 2 and 3 are both class 1
    gt.relations = np.array([[0, 1, 0], [0, 2, 0]])
    # the file-based format lists mask 2 twice, once per class guess, and relates both
    pred = PredictedGraph(
        segment_ids=np.array([1, 2, 2, 3]),
        labels=np.array([0, 2, 1, 1]),
        relations=np.array([[0, 1, 0], [0, 2, 0], [0, 3, 0]]),
        seg=gt.seg,
    )
    rows, src = canonical_rows(pred, "single")
    np.testing.assert_array_equal(rows, [[0, 1, 0], [0, 3, 0]])  # entry 2 merged into entry 1
    np.testing.assert_array_equal(src, [0, 2])
    rec = score_image(gt, pred, ("multi", "single"), num_predicates=2)
    np.testing.assert_array_equal(rec.gc_rank["multi"], [1, 2])  # duplicate entry matches at 1
    np.testing.assert_array_equal(rec.gc_rank["single"], [NO_MATCH, 1])  # first label kept
    assert rec.num_rows == {"multi": 3, "single": 2}


def test_no_graph_constraint_uses_second_best_predicate():
    gt = _gt()
    pscores = np.array([[0.2, 0.7], [0.9, 0.1]])  # row 0: pair (1,2) best "1", GT wants "0"
    pred = PredictedGraph(
        segment_ids=np.array([1, 2, 3]),
        labels=np.array([0, 1, 2]),
        relations=np.array([[0, 1, 1], [1, 2, 0]]),
        seg=gt.seg,
        predicate_scores=pscores,
    )
    rec = score_image(gt, pred, ("multi",))
    np.testing.assert_array_equal(rec.gc_rank["multi"], [NO_MATCH, NO_MATCH])
    # candidates by score: (r1,p0) .9, (r0,p1) .7, (r0,p0) .2, (r1,p1) .1
    np.testing.assert_array_equal(rec.ng_rank["multi"], [2, 3])


def test_distant_flag_uses_one_third_width():
    rec = score_image(
        _gt(),
        PredictedGraph(
            np.zeros(0, int), np.zeros(0, int), np.zeros((0, 3), int), seg=np.zeros((4, 12), int)
        ),
    )
    # centres x 1.5, 5.5, 9.5: 4 px apart each, threshold 12 / 3 = 4 (strictly greater)
    np.testing.assert_array_equal(rec.distant, [False, False])
    gt = _gt()
    gt.relations = np.array([[0, 2, 0]])  # 8 px apart
    assert score_image(
        gt, PredictedGraph(np.zeros(0, int), np.zeros(0, int), np.zeros((0, 3), int), seg=gt.seg)
    ).distant.tolist() == [True]


def test_summarize_without_records_and_bad_predicate():
    res, per = summarize([], ["a", "b"])
    assert math.isnan(res["R@20"]) and res["mR@20"] == 0.0 and res["num_images"] == 0
    rec = score_image(
        _gt(),
        PredictedGraph(
            np.array([1]), np.array([0]), np.zeros((0, 3), int), seg=np.zeros((4, 12), int)
        ),
    )
    with pytest.raises(ValueError, match="image x: ground-truth predicate out of range"):
        summarize([rec], ["only one"])
