"""Provenance of trained weights: what stage 1 calibrated on, what stage 2 was trained on.

Two records travel in safetensors metadata (string -> string; the values are JSON):

* ``spade_stage1`` in every stage-1 output (``model_final.safetensors`` and numbered
  checkpoints), written by the calibration trainer: ``{"dataset": DATASETS.TRAIN[0],
  "split": the registered split ("train"), "ov_split": the dataset's base/novel lists or null
  (closed set), "objects": sorted class names and "predicates": sorted predicate names that
  occur in the teacher prompts}``.
* ``spade_calibration`` in every stage-2 checkpoint, written by
  :class:`spade.engine.SafetensorsCheckpointer` from the backbone's :meth:`provenance`:
  ``{"mode": "calibrated" | "none" | "disabled", "path": absolute path of the stage-1 file,
  "sha256": its content hash, "stage1": its spade_stage1 record}`` (path, hash and stage1 only
  when calibrated). "none": CALIBRATION.ENABLED with no calibrated weights (a zero LoRA and the
  seeded, untrained adapter); "disabled": the no-calibration ablation.

Rules (each violation is a ValueError / FileNotFoundError naming the files and the key):

* :func:`resolve_calibrated_weights` (``--eval-only``, demo.py, the predictor): a config that
  names no calibrated weights takes them from the record of MODEL.WEIGHTS; a named or recorded
  file that is missing, or whose hash differs from the record, is refused.
* :func:`check_no_leakage` (stage 2 loading calibrated weights): when a training dataset of stage 2
  has novel names, stage 1 must have held every one of them out (its recorded ``ov_split``) and
  none may occur in its teacher prompts; a stage-1 file without a record is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, Iterable, Optional, Sequence

__all__ = [
    "STAGE1_KEY",
    "CALIBRATION_KEY",
    "file_sha256",
    "read_metadata",
    "read_record",
    "stage1_record",
    "calibration_record",
    "check_no_leakage",
    "check_recorded_calibration",
    "resolve_calibrated_weights",
]

logger = logging.getLogger(__name__)

STAGE1_KEY = "spade_stage1"
CALIBRATION_KEY = "spade_calibration"
_HASHES: Dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes (cached per path, size and mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def read_metadata(path: str) -> Dict[str, str]:
    """The string metadata of a safetensors file ({} for another format)."""
    if not path.endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors' own error types on a corrupt header
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None


def read_record(metadata: Dict[str, str], key: str, path: str) -> Optional[dict]:
    """The JSON record under ``key`` of a file's metadata (None when absent)."""
    if key not in metadata:
        return None
    try:
        record = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON: {e}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: metadata {key!r} is not a JSON object")
    return record


def stage1_record(dataset: str, metadata, triplets: Iterable[Sequence[str]]) -> dict:
    """The ``spade_stage1`` record of a calibration on ``dataset`` (its MetadataCatalog entry
    ``metadata``) whose teacher prompts use ``triplets`` (subject, predicate, object names)."""
    triplets = list(triplets)
    ov = metadata.get("ov_split", None)
    return {
        "dataset": dataset,
        "split": metadata.get("split", None),
        "ov_split": {k: list(v) for k, v in ov.items()} if ov else None,
        "objects": sorted({t[0] for t in triplets} | {t[2] for t in triplets}),
        "predicates": sorted({t[1] for t in triplets}),
    }


def calibration_record(enabled: bool, path: str, stage1: Optional[dict] = None) -> dict:
    """The ``spade_calibration`` record of a stage-2 model (see the module docstring)."""
    if not enabled:
        return {"mode": "disabled"}
    if not path:
        return {"mode": "none"}
    return {
        "mode": "calibrated",
        "path": os.path.abspath(path),
        "sha256": file_sha256(path),
        "stage1": stage1,
    }


def check_no_leakage(
    stage1: Optional[dict], ov_split: Optional[dict], weights: str, dataset: str
) -> None:
    """Refuse calibrated ``weights`` (stage-1 record ``stage1``) for a stage-2 ``dataset`` whose
    ``ov_split`` has novel names that stage 1 did not hold out or that its prompts used."""
    novel = set((ov_split or {}).get("novel_objects", [])) | set(
        (ov_split or {}).get("novel_predicates", [])
    )
    if not novel:
        return
    if stage1 is None:
        raise ValueError(
            f"MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS {weights}: the file records no stage-1 "
            f"dataset (metadata {STAGE1_KEY!r}), so it cannot be shown free of the novel names of "
            f"{dataset!r}; recalibrate with the stage-1 config of the same open-vocabulary setting"
        )
    held_out = set((stage1.get("ov_split") or {}).get("novel_objects", [])) | set(
        (stage1.get("ov_split") or {}).get("novel_predicates", [])
    )
    seen = set(stage1.get("objects", [])) | set(stage1.get("predicates", []))
    leaked = sorted((novel - held_out) | (novel & seen))
    if leaked:
        raise ValueError(
            f"MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS {weights}: stage 1 calibrated on "
            f"{stage1.get('dataset')!r}, which does not hold out the novel names {leaked[:8]} of "
            f"{dataset!r} (metadata {STAGE1_KEY!r}); use the stage-1 output of the same "
            "open-vocabulary setting"
        )


def check_recorded_calibration(recorded: Optional[dict], current: dict, checkpoint: str) -> None:
    """Refuse loading ``checkpoint`` (record ``recorded``) into a model whose backbone was built
    with another calibration (record ``current``)."""
    if recorded is None:
        raise ValueError(
            f"checkpoint {checkpoint}: metadata {CALIBRATION_KEY!r} is missing, so the stage-1 "
            "weights it was trained on are unknown; set MODEL.SPADE.ALLOW_PARTIAL_CHECKPOINT True "
            "to load it anyway"
        )
    if recorded.get("mode") != current.get("mode"):
        raise ValueError(
            f"checkpoint {checkpoint} was trained with calibration {_describe(recorded)} but the "
            f"model was built with {_describe(current)} (MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS "
            "/ CALIBRATION.ENABLED)"
        )
    if recorded.get("mode") == "calibrated" and recorded.get("sha256") != current.get("sha256"):
        raise ValueError(
            f"checkpoint {checkpoint} was trained on calibrated weights {recorded.get('path')} "
            f"(sha256 {str(recorded.get('sha256'))[:12]}) but MODEL.SPADE.DIFFUSION."
            f"CALIBRATED_WEIGHTS is {current.get('path')} (sha256 {current.get('sha256', '')[:12]})"
        )


def _describe(record: dict) -> str:
    if record.get("mode") == "calibrated":
        return f"'calibrated' ({record.get('path')})"
    return repr(record.get("mode"))


def resolve_calibrated_weights(cfg, weights: str):
    """``cfg`` (a clone when changed) with the calibration of checkpoint ``weights`` filled in.

    A config naming no calibrated weights takes the recorded path (CALIBRATION.ENABLED False when
    the record says "disabled"); a named or recorded file that is missing, or whose hash differs
    from the record, is refused naming both files. A checkpoint without a record is left to the
    checkpointer's check."""
    if not weights or not os.path.isfile(weights):
        return cfg
    record = read_record(read_metadata(weights), CALIBRATION_KEY, weights)
    if record is None:
        return cfg
    named = cfg.MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS
    mode = record.get("mode")
    if mode == "calibrated":
        path, sha = str(record.get("path", "")), str(record.get("sha256", ""))
        target = named or path
        if not os.path.isfile(target):
            raise FileNotFoundError(
                f"checkpoint {weights} was trained on calibrated weights {path}, which "
                f"{'MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS names as ' + named if named else 'is'}"
                " missing; restore the stage-1 file or name it in "
                "MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS"
            )
        if file_sha256(target) != sha:
            raise ValueError(
                f"checkpoint {weights} was trained on calibrated weights {path} (sha256 "
                f"{sha[:12]}) but {target} has sha256 {file_sha256(target)[:12]}"
                + (" (MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS)" if named else "")
            )
        if named:
            return cfg
        logger.info("Calibrated weights from the record of %s: %s", weights, path)
        return _with(cfg, ("MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS", path))
    if named:
        raise ValueError(
            f"checkpoint {weights} was trained with calibration {mode!r} but "
            f"MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS names {named}"
        )
    if mode == "disabled" and cfg.CALIBRATION.ENABLED:
        logger.info(
            "Checkpoint %s was trained without calibration: CALIBRATION.ENABLED False", weights
        )
        return _with(cfg, ("CALIBRATION.ENABLED", False))
    return cfg


def _with(cfg, *pairs):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list([v for pair in pairs for v in pair])
    cfg.freeze()
    return cfg
