"""PSG / VG scene-graph evaluation: the file-based command line and the shared result assembly.

The relation numbers are the PSG benchmark's own (graph-constrained SGDet R@K / mR@K, standard image
skipping, the multiple-MPO protocol), reported beside the strict, present-only, no-graph-constraint,
near / distant, base / novel variants and the fair single-MPO protocol (metric keys: recall.py);
PQ / SQ / RQ are panopticapi's (panoptic.py), from the same single pass over each image's PNGs
(image_pass.py). This module imports numpy, PIL and json only; ``PSGEvaluator`` (the detectron2
DatasetEvaluator, evaluator.py) is imported from here on first access.

Command line (the benchmark's submission format, see submission.py)::

    python -m spade.evaluation.psg_evaluation --gt psg.json --seg-root DIR --pred-dir DIR \
        [--protocol multi|single|both] [--split test] [--output FILE] [--workers N] [--debug]

Bad input (a file, field or flag) gives one line per problem naming the file, the image id and the
field, exit status 2 and nothing scored; ``--debug`` shows the traceback.
"""

import argparse
import multiprocessing
import os
import sys
from collections import OrderedDict
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import EvaluationInputError
from .ground_truth import load_psg_split, ov_split_indices, read_json
from .panoptic import accumulate, pq_summary
from .recall import summarize
from .report import format_per_predicate, format_table, plot_per_predicate, write_json_atomic
from .sgg_metrics import PROTOCOLS, ImageRecord
from .submission import RELATION_JSON, load_relation_json, score_entry

_TASK = {"multi": "psg", "single": "psg_single"}
_MAX_PRINTED = 50  # problems listed on stderr


def protocols_of(protocol: str) -> tuple:
    """The MPO protocols a --protocol value scores ("both": multi then single)."""
    if protocol == "both":
        return PROTOCOLS
    if protocol not in PROTOCOLS:
        raise EvaluationInputError(
            f"protocol must be 'multi', 'single' or 'both', got {protocol!r}"
        )
    return (protocol,)


def compute_results(
    records: Sequence[ImageRecord],
    pq_totals: Optional[np.ndarray],
    class_names: Dict[str, List[str]],
    protocol: str = "multi",
    ks: Sequence[int] = (20, 50, 100),
    ov_split: Optional[Dict[str, List[str]]] = None,
) -> Tuple["OrderedDict[str, Dict[str, float]]", Dict[str, Dict]]:
    """(results, per_predicate) of scored images.

    results = {"psg": ..., ["psg_single": ...,] ["panoptic_seg": ...]}: "psg" holds the selected
    protocol ("psg" = multi and "psg_single" = single for "both"); per_predicate maps the same
    task names to {predicate: {"R@K": ..., "num_triplets": ...}}. pq_totals [C, 4] (tp, fp, fn,
    iou sum per category, panoptic.accumulate), or None to skip PQ.
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
    for i, p in enumerate(protocols_of(protocol)):
        task = "psg" if i == 0 else _TASK[p]
        results[task], per_predicate[task] = summarize(records, predicates, p, ks, novel_p, novel_o)
    if pq_totals is not None:
        isthing = np.arange(len(things) + len(stuff)) < len(things)
        results["panoptic_seg"] = pq_summary(pq_totals, isthing)
    return results, per_predicate


def write_results(results: Dict, per_predicate: Dict, output_dir: str, ks: Sequence[int]) -> None:
    """psg_evaluation.json (results + per-predicate recall) and per_predicate_recall.png."""
    write_json_atomic(
        {**results, "per_predicate": per_predicate}, os.path.join(output_dir, "psg_evaluation.json")
    )
    plot_per_predicate(
        per_predicate["psg"], f"R@{max(ks)}", os.path.join(output_dir, "per_predicate_recall.png")
    )


def _score_task(task):
    return score_entry(*task)


def score_images(
    gt_records: Sequence[Dict], entries: Sequence, pred_dir: str, settings: Dict, workers: int
) -> Iterator[Tuple[Optional[ImageRecord], Optional[np.ndarray], List[str]]]:
    """submission.score_entry of each (ground truth, entry) pair, in order, streamed.

    Images are spread over ``workers`` processes (fork; small results only travel back, so memory
    stays bounded); the output does not depend on ``workers``.
    """
    tasks = ((d, e, pred_dir, settings) for d, e in zip(gt_records, entries))
    n = min(len(gt_records), len(entries))
    if workers <= 1 or n < 2 * workers:
        yield from map(_score_task, tasks)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_score_task, tasks, chunksize=max(1, min(8, n // (4 * workers))))


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    parser.add_argument(
        "--workers",
        type=int,
        default=_default_workers(),
        help="worker processes (default: the usable cores); results do not depend on it",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of bad input")
    return parser.parse_args(argv)


def _read_ov_split(path: str, names: Mapping[str, List[str]]) -> Dict[str, List[str]]:
    ov_split = read_json(path, "open-vocabulary split")
    if not isinstance(ov_split, Mapping) or not all(
        isinstance(ov_split.get(k, []), list) for k in ("novel_predicates", "novel_objects")
    ):
        raise EvaluationInputError(
            f"{path}: must be an object with lists 'novel_predicates' / 'novel_objects'"
        )
    classes = list(names["thing_classes"]) + list(names["stuff_classes"])
    try:
        ov_split_indices(ov_split, classes, names["predicate_classes"])
    except EvaluationInputError as e:
        raise EvaluationInputError(f"{path}: {e}") from e
    return dict(ov_split)


def _run(args: argparse.Namespace) -> int:
    if not 0 < args.iou_threshold <= 1:
        raise EvaluationInputError(f"--iou-threshold must lie in (0, 1], got {args.iou_threshold}")
    if args.workers < 1:
        raise EvaluationInputError(f"--workers must be >= 1, got {args.workers}")
    gt_records, names = load_psg_split(args.gt, args.seg_root, args.split)
    ov_split = _read_ov_split(args.ov_split, names) if args.ov_split else None
    num_classes = len(names["thing_classes"]) + len(names["stuff_classes"])
    entries = load_relation_json(args.pred_dir)
    problems = []
    if len(entries) != len(gt_records):
        problems.append(
            f"{os.path.join(args.pred_dir, RELATION_JSON)} has {len(entries)} entries, the "
            f"{args.split} split of {args.gt} has {len(gt_records)} images with relations"
        )
    settings = {
        "json_file": args.gt,
        "num_classes": num_classes,
        "num_predicates": len(names["predicate_classes"]),
        "protocols": protocols_of(args.protocol),
        "iou_threshold": args.iou_threshold,
        "max_k": 100,
        "panoptic": not args.no_panoptic,
    }
    records, totals = [], np.zeros((num_classes, 4))
    for record, stats, bad in score_images(
        gt_records, entries, args.pred_dir, settings, args.workers
    ):
        problems.extend(bad)
        if record is not None and not problems:
            records.append(record)
            if stats is not None:
                accumulate(totals, stats)
    if problems:
        print(f"{len(problems)} bad entries in {args.pred_dir}; nothing scored:", file=sys.stderr)
        for p in problems[:_MAX_PRINTED]:
            print(f"  {p}", file=sys.stderr)
        if len(problems) > _MAX_PRINTED:
            print(f"  ... and {len(problems) - _MAX_PRINTED} more", file=sys.stderr)
        return 2
    results, per_predicate = compute_results(
        records, None if args.no_panoptic else totals, names, args.protocol, (20, 50, 100), ov_split
    )
    print(format_table(results))
    print(format_per_predicate(per_predicate["psg"]))
    if args.output:
        try:
            write_json_atomic({**results, "per_predicate": per_predicate}, args.output)
        except OSError as e:
            raise EvaluationInputError(f"{args.output}: cannot write --output ({e})") from e
    return 0


def main(argv=None) -> int:
    """Command line entry; returns the exit status (0 scored, 2 bad input: nothing scored)."""
    args = _parse_args(argv)
    try:
        return _run(args)
    except EvaluationInputError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def __getattr__(name: str):
    if name == "PSGEvaluator":  # imports detectron2 (and torch): only when asked for
        from .evaluator import PSGEvaluator

        return PSGEvaluator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
