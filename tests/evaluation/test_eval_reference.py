"""The vectorised scorer against a plain per-pair loop of the benchmark's definitions
(psg_reference.py)."""

import numpy as np
import pytest
from psg_reference import ReferenceRecall

from spade.evaluation.recall import summarize
from spade.evaluation.sgg_metrics import GroundTruthGraph, PredictedGraph, score_image

NUM_CLASSES, NUM_PREDICATES, SIZE = 4, 5, 12


def _random_image(rng, idx):
    h = w = SIZE
    blocks = rng.integers(1, 6, size=(3, 3))
    gt_seg = np.kron(blocks, np.ones((4, 4), dtype=np.int64)) * 10
    ids = np.unique(gt_seg)
    labels = rng.integers(0, NUM_CLASSES, size=len(ids))
    n_rel = int(rng.integers(0, 6))
    rel = np.stack(
        [
            rng.integers(0, len(ids), n_rel),
            rng.integers(0, len(ids), n_rel),
            rng.integers(0, NUM_PREDICATES, n_rel),
        ],
        axis=1,
    ).reshape(-1, 3)
    rel = np.unique(rel, axis=0)
    gt = GroundTruthGraph(str(idx), h, w, labels, rel, ids, seg=gt_seg)
    pred_seg = gt_seg.copy()
    noise = rng.random((h, w)) < 0.25
    pred_seg[noise] = rng.choice(np.append(ids, 0), size=noise.sum())
    p_labels = np.where(rng.random(len(ids)) < 0.8, labels, rng.integers(0, NUM_CLASSES, len(ids)))
    n_rows = int(rng.integers(0, 40)) if idx % 5 else 0
    rows = np.stack(
        [
            rng.integers(0, len(ids), n_rows),
            rng.integers(0, len(ids), n_rows),
            rng.integers(0, NUM_PREDICATES, n_rows),
        ],
        axis=1,
    ).reshape(-1, 3)
    if len(rel) and n_rows:  # plant some true triplets so matches happen
        plant = rel[rng.integers(0, len(rel), size=min(len(rel), n_rows))]
        rows[rng.choice(n_rows, size=len(plant), replace=False)] = plant
    return gt, PredictedGraph(ids, p_labels, rows, seg=pred_seg)


def _reference(images, k):
    ref = ReferenceRecall(NUM_PREDICATES)
    for gt, pred in images:
        ref.add(gt, pred)
    return ref.result(k)


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_equals_reference_loop(seed):
    rng = np.random.default_rng(seed)
    images = [_random_image(rng, i) for i in range(25)]
    records = [
        score_image(g, p, ("multi",), max_k=100, num_predicates=NUM_PREDICATES) for g, p in images
    ]
    res, _ = summarize(records, [f"p{i}" for i in range(NUM_PREDICATES)], ks=(5, 10, 100))
    for k in (5, 10, 100):
        r, mr = _reference(images, k)
        assert res[f"R@{k}"] == pytest.approx(r, abs=1e-9)
        assert res[f"mR@{k}"] == pytest.approx(mr, abs=1e-9)
    assert 0 < res["R@100"] < 100  # the random case exercises both hits and misses
