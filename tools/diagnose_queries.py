#!/usr/bin/env python
"""Where a trained SPADE model loses ground-truth objects, per class (query_diagnosis.py).

    python tools/diagnose_queries.py --config-file configs/synthetic/spade_tiny_synthpsg_ovd.yaml \
        MODEL.WEIGHTS output/ovd/stage2/model_final.safetensors OUTPUT_DIR output/ovd/diagnosis

Runs the model on DATASETS.TEST[0] and, for every ground-truth segment, finds the object query
whose mask fits it best: is there such a proposal (IoU >= 0.5), does that query call it "no
object", and is the segment named right in the final panoptic output. Prints a table per class
and writes OUTPUT_DIR/query_diagnosis.json and query_diagnosis.png.
"""

import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from spade.engine.defaults import argument_parser, run_cli, setup_cfg  # noqa: E402


def _plot(summary, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from spade.utils.io import atomic_write

    names = list(summary)
    rows = [
        ("query mask IoU >= 0.5", [summary[n]["proposal_recall"] for n in names]),
        ('its top class is "no object"', [summary[n]["no_object"] for n in names]),
        (
            "named right in the output",
            [summary[n]["named_right"] / summary[n]["count"] for n in names],
        ),
    ]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 3.2))
    for k, (label, values) in enumerate(rows):
        ax.bar(x + (k - 1) * 0.27, values, 0.27, label=label)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of ground-truth segments")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(args):
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.modeling import build_model
    from detectron2.utils.logger import log_every_n_seconds

    from spade.data.build import build_spade_test_loader
    from spade.engine.checkpoint import SafetensorsCheckpointer
    from spade.engine.defaults import eval_weights
    from spade.evaluation.ground_truth import read_panoptic_png
    from spade.evaluation.query_diagnosis import (
        capture_queries,
        diagnose_image,
        summarize_diagnosis,
    )
    from spade.provenance import resolve_calibrated_weights
    from spade.utils.io import atomic_write_json

    cfg = setup_cfg(args)
    logger = logging.getLogger("spade.diagnose_queries")
    name = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(name)
    classes = list(meta.thing_classes) + list(getattr(meta, "stuff_classes", []))
    weights = eval_weights(cfg)  # an error without weights unless MODEL.SPADE.ALLOW_UNTRAINED
    cfg = resolve_calibrated_weights(cfg, weights)  # the stage-1 weights the checkpoint records
    model = build_model(cfg).eval()
    if weights:
        SafetensorsCheckpointer(
            model, allow_partial=bool(cfg.MODEL.SPADE.ALLOW_PARTIAL_CHECKPOINT)
        ).load(weights)
    vocabulary = list(model.vocabulary.class_names)
    if vocabulary != classes:
        raise ValueError(
            f"{name}: the model's test vocabulary {vocabulary} is not the dataset's classes "
            f"{classes}; this tool compares class ids of both"
        )
    records_by_id = {str(d["image_id"]): d for d in DatasetCatalog.get(name)}
    loader = build_spade_test_loader(cfg, name)
    records, start = [], time.perf_counter()
    for i, batch in enumerate(loader):
        with torch.no_grad(), capture_queries(model) as captured:
            outputs = model(batch)
        for x, out, (probs, masks) in zip(batch, outputs, captured):
            image_id = str(x["image_id"])
            d = records_by_id.get(image_id)
            if d is None or not d.get("pan_seg_file_name"):
                raise ValueError(f"{name}: image {image_id} has no panoptic ground truth")
            ids = read_panoptic_png(d["pan_seg_file_name"], image_id)
            segments = d["segments_info"]
            gt = np.zeros((len(segments),) + ids.shape, dtype=bool)
            for k, s in enumerate(segments):
                gt[k] = ids == s["id"]
            seg, info = out["panoptic_seg"]
            records += diagnose_image(
                gt,
                [s["category_id"] for s in segments],
                probs,
                masks,
                seg.cpu().numpy(),
                info,
                where=image_id,
            )
        log_every_n_seconds(
            logging.INFO,
            f"diagnosed {i + 1}/{len(loader)} images, {time.perf_counter() - start:.0f} s",
            n=10,
            name="spade.diagnose_queries",
        )
    summary = summarize_diagnosis(records, classes)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    atomic_write_json(
        os.path.join(cfg.OUTPUT_DIR, "query_diagnosis.json"),
        {"dataset": name, "weights": weights, "per_class": summary},
        indent=2,
    )
    _plot(summary, os.path.join(cfg.OUTPUT_DIR, "query_diagnosis.png"))
    novel = set((meta.get("ov_split", None) or {}).get("novel_objects", []))
    lines = [
        "| class | count | query mask IoU >= 0.5 | its top class is no object | named right | "
        "no final segment | most often named |",
        "|---|---|---|---|---|---|---|",
    ]
    for cname, s in summary.items():
        tag = " (novel)" if cname in novel else ""
        lines.append(
            f"| {cname}{tag} | {s['count']} | {100 * s['proposal_recall']:.0f} % | "
            f"{100 * s['no_object']:.0f} % | {s['named_right']} | {s['unmatched']} | "
            f"{s['named_as'] or '-'} |"
        )
    print("\n".join(lines))
    logger.info("wrote %s", os.path.join(cfg.OUTPUT_DIR, "query_diagnosis.json"))
    return summary


if __name__ == "__main__":
    args = argument_parser(__doc__).parse_args()
    run_cli(main, args, prog="diagnose_queries.py")
