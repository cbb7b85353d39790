"""PSGEvaluator: the detectron2 DatasetEvaluator of in-training scene-graph (and PQ) evaluation.

The per-image core is the command line's (image_pass.evaluate_image): the ground-truth PNG is
decoded once and one joint histogram gives the relation IoUs and the PQ statistics; only small
per-image records travel between processes. This is the only evaluation module importing
detectron2 (and, through it, torch).
"""

import itertools
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from .ground_truth import ground_truth_from_dict
from .image_pass import evaluate_image
from .panoptic import accumulate
from .predictions import check_prediction, prediction_from_output
from .psg_evaluation import compute_results, protocols_of, write_results
from .report import format_per_predicate, format_table
from .sgg_metrics import ImageRecord, score_image

logger = logging.getLogger(__name__)


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
        self._protocols = protocols_of(protocol)
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
        self._pq_stats: List[np.ndarray] = []  # per image: panoptic.image_pq_stats rows

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
            if self._box_only:
                record = score_image(
                    gt,
                    pred,
                    self._protocols,
                    self._iou_threshold,
                    max(self._ks),
                    True,
                    self._num_predicates,
                )
                stats = None
            else:
                record, stats, _ = evaluate_image(
                    gt,
                    pred,
                    self._protocols,
                    self._iou_threshold,
                    max(self._ks),
                    self._num_predicates,
                    self._panoptic,
                )
            self._records.append(record)
            if self._panoptic:
                self._pq_stats.append(stats)

    def evaluate(self):
        records, pq_stats = self._records, self._pq_stats
        if self._distributed:
            comm.synchronize()
            records = list(itertools.chain(*comm.gather(records, dst=0)))
            pq_stats = list(itertools.chain(*comm.gather(pq_stats, dst=0)))
            if not comm.is_main_process():
                return {}
        if not records:
            logger.warning(f"[PSGEvaluator] no predictions received for {self._dataset_name}")
            return {}
        totals = None
        if self._panoptic:
            totals = np.zeros((self._num_classes, 4))
            for stats in pq_stats:
                accumulate(totals, stats)
        results, per_predicate = compute_results(
            records, totals, self._class_names, self._protocol, self._ks, self._ov_split
        )
        if self._output_dir:
            write_results(results, per_predicate, self._output_dir, self._ks)
        logger.info(
            f"Scene-graph evaluation of {self._dataset_name}:\n{format_table(results)}\n"
            f"{format_per_predicate(per_predicate['psg'])}"
        )
        return results
