"""Speed and peak memory of PSGEvaluator: N SynthPSG images, 100 ranked triplets each.

Generates (or reuses) SynthPSG under ``--root``, registers all its images, and builds model-like
outputs outside the timed part: the ground-truth panoptic map with a band of each segment moved to
void, 10% of the labels wrong, the image's true triplets mixed into 100 ranked rows with random
predicate distributions. The timed part is exactly what inference_on_dataset runs:
reset -> process (per image: read GT PNG, full-resolution IoU, ranks under both protocols, PNG
encoding for PQ) -> evaluate (aggregation + panopticapi PQ). A second pass under tracemalloc
gives the peak memory allocated by Python and numpy during evaluation.

    OMP_NUM_THREADS=1 python benchmarks/bench_evaluator.py --num-images 1000 --out bench.json
"""

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from spade.data.datasets.psg import load_psg_json, psg_metadata  # noqa: E402
from spade.data.synthpsg import ensure_synthpsg  # noqa: E402
from spade.evaluation.ground_truth import read_panoptic_png  # noqa: E402
from spade.evaluation.psg_evaluation import PSGEvaluator  # noqa: E402


def fake_output(d, num_classes: int, num_predicates: int, rows: int, rng) -> dict:
    """A model-like output for dataset dict ``d`` (docs/INTERFACES.md format)."""
    seg = read_panoptic_png(d["pan_seg_file_name"])
    seg[:, ::9] = 0  # every 9th column becomes void: IoUs drop below 1, most stay >= 0.5
    segs = []
    for s in d["segments_info"]:
        cat = s["category_id"] if rng.random() > 0.1 else int(rng.integers(num_classes))
        segs.append({"id": s["id"], "category_id": cat, "isthing": s["isthing"], "score": 0.9})
    ids = np.array([s["id"] for s in d["segments_info"]])
    gt = np.array(d["relations"], dtype=np.int64).reshape(-1, 3)
    trip = np.stack(
        [
            ids[rng.integers(len(ids), size=rows)],
            ids[rng.integers(len(ids), size=rows)],
            rng.integers(num_predicates, size=rows),
        ],
        axis=1,
    )
    if len(gt):
        pos = rng.choice(rows, size=min(len(gt), rows), replace=False)
        trip[pos] = np.stack([ids[gt[:, 0]], ids[gt[:, 1]], gt[:, 2]], axis=1)[: len(pos)]
    logits = torch.from_numpy(rng.normal(size=(rows, num_predicates))).float()
    logits[torch.arange(rows), torch.from_numpy(trip[:, 2])] += 4.0
    pscores = logits.softmax(-1)
    scores = pscores[torch.arange(rows), torch.from_numpy(trip[:, 2])]
    order = torch.argsort(scores, descending=True)
    return {
        "panoptic_seg": (torch.from_numpy(seg.astype(np.int32)), segs),
        "relations": {
            "triplets": torch.from_numpy(trip)[order],
            "scores": scores[order],
            "predicate_scores": pscores[order],
        },
    }


def run_once(name: str, dicts, outputs, protocol: str) -> dict:
    ev = PSGEvaluator(name, distributed=False, protocol=protocol)
    t0 = time.perf_counter()
    ev.reset()
    for d, out in zip(dicts, outputs):
        ev.process([{"image_id": d["image_id"]}], [out])
    t1 = time.perf_counter()
    results = ev.evaluate()
    t2 = time.perf_counter()
    return {"process_s": t1 - t0, "evaluate_s": t2 - t1, "total_s": t2 - t0, "results": results}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=100, help="ranked triplets per image")
    parser.add_argument("--protocol", default="both", choices=["multi", "single", "both"])
    parser.add_argument(
        "--root", default=os.path.join(tempfile.gettempdir(), "spade_bench_synthpsg")
    )
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    logging.getLogger("spade").setLevel(logging.WARNING)

    root = ensure_synthpsg(f"{args.root}_{args.num_images}", num_images=args.num_images)
    json_file = os.path.join(root, "psg.json")
    dicts = [d for d in load_psg_json(json_file, root, root, "all") if d["relations"]]
    with open(json_file) as f:
        psg = json.load(f)
    name = "bench_synthpsg_all"
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(
        **psg_metadata(psg["thing_classes"], psg["stuff_classes"], psg["predicate_classes"])
    )
    num_classes = len(psg["thing_classes"]) + len(psg["stuff_classes"])
    rng = np.random.default_rng(0)
    outputs = [
        fake_output(d, num_classes, len(psg["predicate_classes"]), args.rows, rng) for d in dicts
    ]

    timed = run_once(name, dicts, outputs, args.protocol)
    tracemalloc.start()
    run_once(name, dicts, outputs, args.protocol)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    n = len(dicts)
    row = {
        "images": n,
        "rows_per_image": args.rows,
        "protocol": args.protocol,
        "image_size": f"{dicts[0]['height']}x{dicts[0]['width']}",
        "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "process_s": round(timed["process_s"], 3),
        "evaluate_s": round(timed["evaluate_s"], 3),
        "total_s": round(timed["total_s"], 3),
        "images_per_s": round(n / timed["total_s"], 1),
        "peak_traced_MiB": round(peak / 2**20, 1),
        "max_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "R@20/50/100": [round(timed["results"]["psg"][f"R@{k}"], 2) for k in (20, 50, 100)],
        "mR@20/50/100": [round(timed["results"]["psg"][f"mR@{k}"], 2) for k in (20, 50, 100)],
        "PQ": round(timed["results"]["panoptic_seg"]["PQ"], 2),
    }
    width = max(len(k) for k in row)
    print("PSGEvaluator benchmark")
    for k, v in row.items():
        print(f"  {k:<{width}}  {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)
    return row


if __name__ == "__main__":
    main()
