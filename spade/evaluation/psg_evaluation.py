"""PSG / VG scene-graph evaluation: a detectron2 DatasetEvaluator and a file-based command line.

The relation numbers are the PSG benchmark's own (graph-constrained SGDet R@K / mR@K, standard image
skipping, the multiple-MPO protocol), reported beside the strict, present-only, no-graph-constraint,
near / distant, base / novel variants and the fair single-MPO protocol (metric keys: recall.py).

Command line (the benchmark's submission format, see submission.py)::

    python -m spade.evaluation.psg_evaluation --gt psg.json --seg-root DIR --pred-dir DIR \
        [--protocol multi|single|both] [--split test] [--output FILE]
"""

import argparse
import itertools
import json
import logging
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from .ground_truth import ground_truth_from_dict, load_psg_split, ov_split_indices
from .panoptic import encode_panoptic_png, panoptic_quality
from .predictions import check_prediction, prediction_from_output
from .recall import summarize
from .report import format_per_predicate, format_table, plot_per_predicate, write_json_atomic
from .sgg_metrics import PROTOCOLS, ImageRecord, score_image
from .submission import load_relation_json, read_entry

logger = logging.getLogger(__name__)

_TASK = {"multi": "psg", "single": "psg_single"}


def _protocols(protocol: str) -> tuple:
    if protocol == "both":
        return PROTOCOLS
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be 'multi', 'single' or 'both', got {protocol!r}")
    return (protocol,)


def compute_results(
    records: Sequence[ImageRecord],
    pq_items: Optional[tuple],
    class_names: Dict[str, List[str]],
    protocol: str = "multi",
    ks: Sequence[int] = (20, 50, 100),
    ov_split: Optional[Dict[str, List[str]]] = None,
) -> Tuple["OrderedDict[str, Dict[str, float]]", Dict[str, Dict]]:
    """(results, per_predicate) of scored images.

    results = {"psg": ..., ["psg_single": ...,] ["panoptic_seg": ...]}: "psg" holds the selected
    protocol ("psg" = multi and "psg_single" = single for "both"); per_predicate maps the same
    task names to {predicate: {"R@K": ..., "num_triplets": ...}}. pq_items = (gt_items,
    pred_items) for panoptic_quality, or None to skip PQ.
    """
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        seen, dup = set(), set()
        for i in ids:
            (dup if i in seen else seen).add(i)
        raise ValueError(f"image(s) {sorted(dup)[:5]} were evaluated more than once")
    things, stuff = class_names["thing_classes"], class_names["stuff_classes"]
    predicates = class_names["predicate_classes"]
    novel_p = novel_o = None
    if ov_split:
        novel_p, novel_o = ov_split_indices(ov_split, list(things) + list(stuff), predicates)
    results: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
    per_predicate = {}
    for i, p in enumerate(_protocols(protocol)):
        task = "psg" if i == 0 else _TASK[p]
        results[task], per_predicate[task] = summarize(records, predicates, p, ks, novel_p, novel_o)
    if pq_items is not None:
        categories = [
            {"id": i, "name": n, "isthing": int(i < len(things))}
            for i, n in enumerate(list(things) + list(stuff))
        ]
        results["panoptic_seg"] = panoptic_quality(pq_items[0], pq_items[1], categories)
    return results, per_predicate


def write_results(results: Dict, per_predicate: Dict, output_dir: str, ks: Sequence[int]) -> None:
    """psg_evaluation.json (results + per-predicate recall) and per_predicate_recall.png."""
    write_json_atomic(
        {**results, "per_predicate": per_predicate}, os.path.join(output_dir, "psg_evaluation.json")
    )
    plot_per_predicate(
        per_predicate["psg"], f"R@{max(ks)}", os.path.join(output_dir, "per_predicate_recall.png")
    )


class PSGEvaluator(DatasetEvaluator):
    """Scene-graph (and panoptic) evaluation of a registered PSG-style dataset.

    Reads model outputs {"panoptic_seg": (seg [H, W], segments_info), "relations": {"triplets"
    [T, 3] segment ids + predicate, "scores" [T] descending, "predicate_scores" [T, P]}} and the
    ground truth of the dataset dicts (panoptic PNGs; segment boxes when metadata.box_only).
    Works under distributed inference: per-image records are gathered to the main process.
    """

    @configurable
    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        protocol: str = "multi",
        iou_threshold: float = 0.5,
        recall_ks: Sequence[int] = (20, 50, 100),
        panoptic: bool = True,
        distributed: bool = True,
    ):
        """
        Args:
            dataset_name: a DatasetCatalog name with PSG metadata (docs/INTERFACES.md).
            output_dir: where the JSON results and the per-predicate chart go (None: nowhere).
            protocol: "multi" (benchmark), "single" (one predicate distribution per pair) or "both".
            iou_threshold: subject and object IoU needed for a match.
            recall_ks: the K of R@K (the largest bounds the rows scored per image).
            panoptic: also compute PQ / SQ / RQ (never for box-only datasets).
            distributed: gather records from all processes in evaluate().
        """
        self._protocols = _protocols(protocol)
        self._protocol = protocol
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._iou_threshold = float(iou_threshold)
        self._ks = tuple(int(k) for k in recall_ks)
        self._distributed = distributed
        meta = MetadataCatalog.get(dataset_name)
        self._class_names = {
            k: list(getattr(meta, k))
            for k in ("thing_classes", "stuff_classes", "predicate_classes")
        }
        self._ov_split = meta.get("ov_split", None)
        self._box_only = bool(meta.get("box_only", False))
        self._panoptic = bool(panoptic) and not self._box_only
        self._num_classes = len(self._class_names["thing_classes"]) + len(
            self._class_names["stuff_classes"]
        )
        self._num_predicates = len(self._class_names["predicate_classes"])
        self._gt_dicts: Optional[Dict[str, Dict]] = None
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        return {
            "dataset_name": dataset_name,
            "output_dir": output_dir,
            "protocol": cfg.TEST.PSG_EVAL.PROTOCOL,
            "iou_threshold": cfg.TEST.PSG_EVAL.IOU_THRESHOLD,
            "recall_ks": tuple(cfg.TEST.PSG_EVAL.RECALL_KS),
            "panoptic": cfg.TEST.PSG_EVAL.PANOPTIC,
        }

    def reset(self) -> None:
        self._records: List[ImageRecord] = []
        self._pq_preds: List[Dict] = []

    def _ground_truth_dicts(self) -> Dict[str, Dict]:
        if self._gt_dicts is None:
            self._gt_dicts = {str(d["image_id"]): d for d in DatasetCatalog.get(self._dataset_name)}
        return self._gt_dicts

    def process(self, inputs, outputs) -> None:
        gt_dicts = self._ground_truth_dicts()
        for inp, out in zip(inputs, outputs):
            image_id = str(inp["image_id"])
            if image_id not in gt_dicts:
                raise ValueError(
                    f"image {image_id}: image_id not in the ground truth of {self._dataset_name}"
                )
            gt = ground_truth_from_dict(gt_dicts[image_id], self._box_only)
            pred = prediction_from_output(out, image_id)
            problems = check_prediction(
                pred, gt, self._num_classes, self._num_predicates, self._box_only
            )
            if problems:
                raise ValueError("; ".join(problems))
            self._records.append(
                score_image(
                    gt,
                    pred,
                    self._protocols,
                    self._iou_threshold,
                    max(self._ks),
                    self._box_only,
                    self._num_predicates,
                )
            )
            if self._panoptic:
                png, segs = encode_panoptic_png(pred.seg, out["panoptic_seg"][1])
                self._pq_preds.append({"image_id": image_id, "png": png, "segments_info": segs})

    def evaluate(self):
        records, pq_preds = self._records, self._pq_preds
        if self._distributed:
            comm.synchronize()
            records = list(itertools.chain(*comm.gather(records, dst=0)))
            pq_preds = list(itertools.chain(*comm.gather(pq_preds, dst=0)))
            if not comm.is_main_process():
                return {}
        if not records:
            logger.warning(f"[PSGEvaluator] no predictions received for {self._dataset_name}")
            return {}
        pq_items = None
        if self._panoptic:
            gt_dicts = self._ground_truth_dicts()
            gt_items = [
                {
                    "image_id": p["image_id"],
                    "file_name": gt_dicts[p["image_id"]]["pan_seg_file_name"],
                    "segments_info": gt_dicts[p["image_id"]]["segments_info"],
                }
                for p in pq_preds
            ]
            pq_items = (gt_items, pq_preds)
        results, per_predicate = compute_results(
            records, pq_items, self._class_names, self._protocol, self._ks, self._ov_split
        )
        if self._output_dir:
            write_results(results, per_predicate, self._output_dir, self._ks)
        logger.info(
            f"Scene-graph evaluation of {self._dataset_name}:\n{format_table(results)}\n"
            f"{format_per_predicate(per_predicate['psg'])}"
        )
        return results


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m spade.evaluation.psg_evaluation",
        description="Score predictions in the PSG benchmark's file-based format "
        "(relation.json + panseg/ PNGs, 1-based category and predicate ids, no relation cap).",
    )
    parser.add_argument("--gt", required=True, help="psg.json of the benchmark")
    parser.add_argument(
        "--seg-root", required=True, help="folder of the ground-truth panoptic PNGs"
    )
    parser.add_argument("--pred-dir", required=True, help="folder with relation.json and panseg/")
    parser.add_argument("--protocol", default="multi", choices=["multi", "single", "both"])
    parser.add_argument("--split", default="test", choices=["test", "val", "train"])
    parser.add_argument("--output", default=None, help="write all metrics to this JSON file")
    parser.add_argument("--ov-split", default=None, help="JSON with novel_predicates/novel_objects")
    parser.add_argument("--iou-threshold", type=float, default=0.5)
    parser.add_argument("--no-panoptic", action="store_true", help="skip PQ / SQ / RQ")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Command line entry; returns the exit status (1 when there are bad entries)."""
    args = _parse_args(argv)
    gt_records, names = load_psg_split(args.gt, args.seg_root, args.split)
    ov_split = None
    if args.ov_split:
        with open(args.ov_split) as f:
            ov_split = json.load(f)
    num_classes = len(names["thing_classes"]) + len(names["stuff_classes"])
    num_predicates = len(names["predicate_classes"])
    try:
        entries = load_relation_json(args.pred_dir)
    except ValueError as e:
        print(f"bad submission: {e}", file=sys.stderr)
        return 1
    problems = []
    if len(entries) != len(gt_records):
        problems.append(
            f"relation.json has {len(entries)} entries, the {args.split} split has "
            f"{len(gt_records)} images with relations"
        )
    records, gt_items, pred_items = [], [], []
    for d, entry in zip(gt_records, entries):
        try:
            gt = ground_truth_from_dict(d)
        except (OSError, ValueError) as e:
            problems.append(f"ground truth: {e}")
            continue
        pred, bad = read_entry(entry, args.pred_dir, gt, num_classes, num_predicates)
        problems.extend(bad)
        if pred is None:
            continue
        records.append(
            score_image(
                gt, pred, _protocols(args.protocol), args.iou_threshold, 100, False, num_predicates
            )
        )
        if not args.no_panoptic:
            segs = [
                {"id": int(i), "category_id": int(c)} for i, c in zip(pred.segment_ids, pred.labels)
            ]
            png, segs = encode_panoptic_png(pred.seg, segs)
            pred_items.append({"image_id": gt.image_id, "png": png, "segments_info": segs})
            gt_items.append(
                {
                    "image_id": gt.image_id,
                    "file_name": d["pan_seg_file_name"],
                    "segments_info": d["segments_info"],
                }
            )
    if problems:
        print(f"{len(problems)} bad entries in {args.pred_dir}; nothing scored:", file=sys.stderr)
        for p in problems[:50]:
            print(f"  {p}", file=sys.stderr)
        if len(problems) > 50:
            print(f"  ... and {len(problems) - 50} more", file=sys.stderr)
        return 1
    pq_items = None if args.no_panoptic else (gt_items, pred_items)
    results, per_predicate = compute_results(
        records, pq_items, names, args.protocol, (20, 50, 100), ov_split
    )
    print(format_table(results))
    print(format_per_predicate(per_predicate["psg"]))
    if args.output:
        write_json_atomic({**results, "per_predicate": per_predicate}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
