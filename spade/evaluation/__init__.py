"""Scene-graph evaluation: PSG / VG relation recall (benchmark-compatible and fair protocols),
panoptic quality, and the benchmark's file-based submission format.

``PSGEvaluator`` lives in :mod:`spade.evaluation.psg_evaluation` (also the command line,
``python -m spade.evaluation.psg_evaluation``); it is imported on first access here so that running
that module as a script does not import it twice.
"""

from .recall import summarize
from .sgg_metrics import GroundTruthGraph, ImageRecord, PredictedGraph, score_image
from .submission import export_submission

_LAZY = ("PSGEvaluator", "compute_results", "main")

__all__ = [
    *_LAZY,
    "summarize",
    "score_image",
    "GroundTruthGraph",
    "PredictedGraph",
    "ImageRecord",
    "export_submission",
]


def __getattr__(name: str):
    if name in _LAZY:
        from . import psg_evaluation

        return getattr(psg_evaluation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
