"""A plain re-implementation of the PSG benchmark's relation metric (graph-constrained R@K / mR@K),
written as a per-row, per-triplet loop; the exactness tests compare the vectorised evaluator with
it, and benchmarks/bench_evaluator.py times it as "the benchmark's own code".

The loop spells out the benchmark's evaluator: skip images without ground-truth relations or
without predicted rows; a row's matches are the ground-truth triplets with equal labels and
predicate and boolean-mask IoU >= 0.5 for subject and object; R@K is the union of the matches of
the first K rows over the ground-truth count, averaged over images; mR@K collects per-image
per-predicate recall, averages per predicate and divides the sum by the vocabulary size.
"""

import json
import os
import sys
from collections import namedtuple

import numpy as np
from panopticapi.utils import rgb2id
from PIL import Image

# the fields the loop reads (spade's GroundTruthGraph / PredictedGraph have them too); the
# reference imports nothing of spade, so timing it never pays for spade's imports
Graph = namedtuple("Graph", "relations labels segment_ids seg")


def row_matches(gt, pred) -> list:
    """For every predicted row, the list of ground-truth triplet indices it matches."""
    matches = []
    for s, o, p in pred.relations:
        hit = []
        for g, (gs, go, gp) in enumerate(gt.relations):
            if (pred.labels[s], p, pred.labels[o]) != (gt.labels[gs], gp, gt.labels[go]):
                continue
            ious = []
            for pe, ge in ((s, gs), (o, go)):
                a = pred.seg == pred.segment_ids[pe]
                b = gt.seg == gt.segment_ids[ge]
                ious.append(np.count_nonzero(a & b) / np.count_nonzero(a | b))
            if min(ious) >= 0.5:
                hit.append(g)
        matches.append(hit)
    return matches


class ReferenceRecall:
    """Accumulates images one at a time (masks are not kept); ``result(k)`` -> (R@K, mR@K) %."""

    def __init__(self, num_predicates: int):
        self.num_predicates = num_predicates
        self.images = []  # (ground-truth predicates [R], per-row matches)

    def add(self, gt, pred) -> None:
        if len(gt.relations) == 0 or len(pred.relations) == 0:
            return
        self.images.append((np.asarray(gt.relations)[:, 2].copy(), row_matches(gt, pred)))

    def result(self, k: int):
        recalls, per_pred = [], [[] for _ in range(self.num_predicates)]
        for predicates, matches in self.images:
            matched = set().union(*matches[:k])
            recalls.append(len(matched) / len(predicates))
            for p in range(self.num_predicates):
                idx = [g for g in range(len(predicates)) if predicates[g] == p]
                if idx:
                    per_pred[p].append(sum(g in matched for g in idx) / len(idx))
        mr = sum(np.mean(v) if v else 0.0 for v in per_pred) / self.num_predicates
        return 100 * np.mean(recalls), 100 * mr


def _read_png(path: str) -> np.ndarray:
    return rgb2id(np.array(Image.open(path).convert("RGB"), dtype=np.uint32))


def reference_from_files(gt_json: str, seg_root: str, pred_dir: str, ks=(20, 50, 100)) -> dict:
    """R@K / mR@K of a submission folder the benchmark's way (its test loader: images of
    test_image_ids with relations, labels from annotations, duplicate triplets removed; 1-based
    submission ids), one PNG decode per map."""
    with open(gt_json) as f:
        data = json.load(f)
    with open(os.path.join(pred_dir, "relation.json")) as f:
        entries = json.load(f)
    test_ids = set(str(i) for i in data["test_image_ids"])
    images = [d for d in data["data"] if d["relations"] and str(d["image_id"]) in test_ids]
    ref = ReferenceRecall(len(data["predicate_classes"]))
    for d, e in zip(images, entries):
        rel = np.asarray(d["relations"], dtype=np.int64).reshape(-1, 3)
        rel = rel[np.sort(np.unique(rel, axis=0, return_index=True)[1])]
        gt = Graph(
            rel,
            np.asarray([a["category_id"] for a in d["annotations"]]),
            np.asarray([s["id"] for s in d["segments_info"]]),
            _read_png(os.path.join(seg_root, d["pan_seg_file_name"])),
        )
        rows = np.asarray(e["relations"], dtype=np.int64).reshape(-1, 3) - [0, 0, 1]
        pred = Graph(
            rows,
            np.asarray([s["category_id"] - 1 for s in e["segments_info"]]),
            np.asarray([s["id"] for s in e["segments_info"]]),
            _read_png(os.path.join(pred_dir, "panseg", e["pan_seg_file_name"])),
        )
        ref.add(gt, pred)
    out = {}
    for k in ks:
        out[f"R@{k}"], out[f"mR@{k}"] = ref.result(k)
    return out


if __name__ == "__main__":  # python psg_reference.py psg.json SEG_ROOT PRED_DIR
    print(json.dumps(reference_from_files(*sys.argv[1:4])))
