"""Set-up and flow of ``projects/SPADE/pretrain_net.py`` (stage 0).

``run_pretraining``: train ``PRETRAIN.TASK`` (``--resume`` continues the last checkpoint), export
the model in its standard format into ``PRETRAIN.EXPORT_DIR`` with a manifest, then measure its
gates on synthpsg_val (spade.pretrain.gates) and record them in the manifest. ``--eval-only``
re-measures the gates of an exported model and updates its manifest.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from spade.utils.manifest import read_manifest, write_manifest

from .config import add_pretrain_config
from .engine import PretrainTrainer, get_task
from .tasks import chain_training_runs, training_info

__all__ = ["setup_pretrain_cfg", "run_pretraining", "measure_and_record_gates"]

logger = logging.getLogger(__name__)


def setup_pretrain_cfg(args, *, do_default_setup: bool = True) -> CfgNode:
    """get_cfg + add_pretrain_config + the YAML + opts; CPU when no GPU; detectron2 set-up."""
    cfg = get_cfg()
    add_pretrain_config(cfg)
    if getattr(args, "config_file", ""):
        if not os.path.isfile(args.config_file):
            raise FileNotFoundError(f"--config-file {args.config_file} does not exist")
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(getattr(args, "opts", []) or []))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    get_task(cfg)  # an unknown task fails before anything runs
    cfg.freeze()
    if do_default_setup:
        default_setup(cfg, args)
        # SPADE's own loggers (spade.*: export, gates, loss guard) to the console and
        # OUTPUT_DIR/log.txt as well, as spade.engine.default_setup does for stages 1 and 2
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="spade")
    return cfg


def measure_and_record_gates(cfg: CfgNode, folder: str) -> dict:
    """Measure the task's gates on the exported model in ``folder``; update its manifest."""
    from . import gates

    results = gates.measure(cfg, folder)
    manifest = read_manifest(folder) or {}
    files = list(manifest.pop("files", {}))
    manifest["gates"] = results
    write_manifest(folder, files, manifest)
    logger.info("gates of %s:\n%s", folder, json.dumps(results, indent=2))
    return results


def run_pretraining(cfg: CfgNode, args) -> dict:
    task = get_task(cfg)
    if args.eval_only:
        return (
            measure_and_record_gates(cfg, _exported_folder(cfg)) if comm.is_main_process() else {}
        )
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    if not comm.is_main_process():
        return {}
    # a continuation (MODEL.WEIGHTS from the run whose export it replaces) lists the whole chain
    try:
        previous = read_manifest(_exported_folder(cfg))
    except ValueError as e:  # the old export is replaced anyway; this run's record must not be lost
        logger.warning("%s; the new manifest lists this run only", e)
        previous = None
    info = chain_training_runs(training_info(cfg, trainer), previous, str(cfg.MODEL.WEIGHTS))
    folder = task.export(cfg, trainer.unwrapped_model(), info)
    logger.info("exported %s to %s", cfg.PRETRAIN.TASK, folder)
    if not getattr(args, "skip_gates", False):
        return measure_and_record_gates(cfg, folder)
    return {}


def _exported_folder(cfg: CfgNode) -> str:
    sub = {"clip": "", "vae": "vae", "unet": "unet"}[str(cfg.PRETRAIN.TASK)]
    return os.path.join(str(cfg.PRETRAIN.EXPORT_DIR), sub) if sub else str(cfg.PRETRAIN.EXPORT_DIR)
