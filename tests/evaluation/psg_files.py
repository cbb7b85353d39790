"""Randomised PSG benchmark files: psg.json, ground-truth PNGs and a submission folder
(relation.json + panseg/), for the exactness tests and benchmarks/bench_evaluator.py.

Maps are Voronoi partitions (drawn at 1/8 resolution, upsampled) with void bands, crowd
segments, tiny 1-4 pixel segments and COCO-style large ids in the ground truth; predictions move
the Voronoi seeds, drop and add segments, mislabel some, repeat some segment entries, and rank
``rows`` relations with the true triplets planted among random ones.
"""

import json
import os

import numpy as np
from panopticapi.utils import id2rgb
from PIL import Image

NUM_THINGS, NUM_STUFF, NUM_PREDICATES = 80, 53, 56


def _voronoi(rng, seeds: np.ndarray, height: int, width: int, step: int = 8) -> np.ndarray:
    """[H, W] index of the nearest seed ((y, x) in pixels) on a step-pixel grid."""
    ys = (np.arange(0, height, step) + step / 2)[:, None, None]
    xs = (np.arange(0, width, step) + step / 2)[None, :, None]
    d = (ys - seeds[None, None, :, 0]) ** 2 + (xs - seeds[None, None, :, 1]) ** 2
    small = d.argmin(-1)
    return np.repeat(np.repeat(small, step, 0), step, 1)[:height, :width]


def _save(ids: np.ndarray, path: str) -> None:
    Image.fromarray(id2rgb(ids)).save(path)


def _image(rng, i: int, height: int, width: int, rows: int, root: str, pred_dir: str):
    n = int(rng.integers(8, 24))
    seeds = rng.random((n, 2)) * [height, width]
    gt_idx = _voronoi(rng, seeds, height, width)
    gt_ids = rng.choice(np.arange(1, 256**3), size=n + 3, replace=False)
    gt = gt_ids[gt_idx]
    y0 = int(rng.integers(0, height - 8))
    gt[y0 : y0 + int(rng.integers(2, 8))] = 0  # a void band
    for t in range(3):  # tiny segments, 1..4 pixels
        y, x = int(rng.integers(0, height - 2)), int(rng.integers(0, width - 2))
        gt[y : y + int(rng.integers(1, 3)), x : x + int(rng.integers(1, 3))] = gt_ids[n + t]
    present, areas = np.unique(gt[gt > 0], return_counts=True)
    cats = rng.integers(0, NUM_THINGS + NUM_STUFF, size=len(present))
    crowd = (cats < NUM_THINGS) & (rng.random(len(present)) < 0.08)
    segs = [
        {
            "id": int(s),
            "category_id": int(c),
            "iscrowd": int(k),
            "isthing": bool(c < NUM_THINGS),
            "area": int(a),
        }
        for s, c, k, a in zip(present, cats, crowd, areas)
    ]
    r = int(rng.integers(1, 12))
    rel = np.stack(
        [
            rng.integers(0, len(segs), r),
            rng.integers(0, len(segs), r),
            rng.integers(0, NUM_PREDICATES, r),
        ],
        axis=1,
    )
    rel = rel[rel[:, 0] != rel[:, 1]]
    if len(rel) == 0:
        rel = np.array([[0, 1, int(rng.integers(NUM_PREDICATES))]])
    gt_name = f"gt_{i}.png"
    _save(gt, os.path.join(root, gt_name))

    keep = rng.random(n) < 0.85
    pseeds = seeds[keep] + rng.normal(scale=0.015 * min(height, width), size=(keep.sum(), 2))
    extra = rng.random((int(rng.integers(0, 4)), 2)) * [height, width]
    pseeds = np.concatenate([pseeds, extra])
    pidx = _voronoi(rng, pseeds, height, width)
    pred = (pidx + 1).astype(np.int64)
    pred[:, int(rng.integers(0, width - 4)) :][:, :3] = 0  # a void column band
    pred[int(rng.integers(0, height - 1)), int(rng.integers(0, width - 1))] = len(pseeds) + 1
    pids = np.unique(pred[pred > 0])
    # label of each predicted segment: the category of the ground truth it overlaps most
    pcats = []
    lut = {int(s["id"]): s["category_id"] for s in segs}
    for pid in pids:
        under, counts = np.unique(gt[pred == pid], return_counts=True)
        best = int(under[counts.argmax()])
        cat = lut.get(best, int(rng.integers(NUM_THINGS + NUM_STUFF)))
        if rng.random() < 0.1:
            cat = int(rng.integers(NUM_THINGS + NUM_STUFF))
        pcats.append(cat)
    entries_segs = [{"id": int(p), "category_id": int(c) + 1} for p, c in zip(pids, pcats)]
    dup = int(rng.integers(len(entries_segs)))
    entries_segs.append(dict(entries_segs[dup]))  # a repeated mask (multiple-MPO submissions)
    # the predicted entry overlapping each ground-truth segment most
    best_entry = []
    for s in segs:
        under, counts = np.unique(pred[gt == s["id"]], return_counts=True)
        hit = np.searchsorted(pids, under[counts.argmax()])
        best_entry.append(int(hit) if under[counts.argmax()] > 0 else 0)
    s_count = len(entries_segs)
    table = np.stack(
        [
            rng.integers(0, s_count, rows),
            rng.integers(0, s_count, rows),
            rng.integers(1, NUM_PREDICATES + 1, rows),
        ],
        axis=1,
    )
    for g, (gs, go, gp) in enumerate(rel):
        table[int(rng.integers(0, rows))] = [best_entry[gs], best_entry[go], gp + 1]
    pred_name = f"{i}.png"
    _save(pred, os.path.join(pred_dir, "panseg", pred_name))
    image = {
        "file_name": f"test/{i}.jpg",
        "height": height,
        "width": width,
        "image_id": str(1000 + i),
        "pan_seg_file_name": gt_name,
        "segments_info": segs,
        "annotations": [
            {"bbox": [0, 0, 1, 1], "bbox_mode": 0, "category_id": s["category_id"]} for s in segs
        ],
        "relations": rel.tolist(),
    }
    entry = {
        "image_id": str(1000 + i),
        "relations": table.tolist(),
        "segments_info": entries_segs,
        "pan_seg_file_name": pred_name,
    }
    return image, entry


def write_psg_case(
    root: str, num_images: int, height: int, width: int, seed: int = 0, rows: int = 150
):
    """Write psg.json, gt_*.png (under root) and root/submission; returns (gt json, seg root,
    submission folder)."""
    rng = np.random.default_rng(seed)
    pred_dir = os.path.join(root, "submission")
    os.makedirs(os.path.join(pred_dir, "panseg"), exist_ok=True)
    images, entries = [], []
    for i in range(num_images):
        image, entry = _image(rng, i, height, width, rows, root, pred_dir)
        images.append(image)
        entries.append(entry)
    psg = {
        "data": images + [dict(images[0], image_id="train-0")],
        "thing_classes": [f"thing{i}" for i in range(NUM_THINGS)],
        "stuff_classes": [f"stuff{i}" for i in range(NUM_STUFF)],
        "predicate_classes": [f"predicate{i}" for i in range(NUM_PREDICATES)],
        "test_image_ids": [im["image_id"] for im in images],
    }
    gt_json = os.path.join(root, "psg.json")
    with open(gt_json, "w") as f:
        json.dump(psg, f)
    with open(os.path.join(pred_dir, "relation.json"), "w") as f:
        json.dump(entries, f)
    return gt_json, root, pred_dir
