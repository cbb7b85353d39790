"""Stage-1 calibration trainer: SPADE's engine (:class:`spade.engine.SPADETrainer`) with the
calibration model, its teacher-map cache and its hooks.

Order of work in :class:`CalibrationTrainer` (DefaultTrainer's construction order):

1. ``build_model``: the CalibrationModel (frozen VAE / UNet / CLIP, LoRA, implicit text encoder);
   the teacher is fingerprinted and the teacher-map cache filled for the training and held-out
   images, each rank computing its shard ``items[rank::world_size]``, then all ranks wait: the
   cache is complete before any trained weight exists (so the full fine-tuning ablation, which
   changes the UNet itself, still gets maps from the untouched teacher);
2. the shared optimizer builder (only LoRA / attn2 + MLP adapter are trainable), the guarded
   training loop (DDP with ``device_ids=None`` on CPU, AMP, non-finite loss guard) and the
   shared safetensors checkpointer (the model writes its stage-2 input format itself, with the
   ``spade_stage1`` record of the dataset, split and teacher-prompt names: spade.provenance);
3. hooks: IterationTimer, LRScheduler, PeriodicCheckpointer, EvalHook (held-out L_cal, mean
   over all ranks), PeriodicWriter (console, metrics.json, TensorBoard).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List

import torch
from detectron2.engine import hooks
from detectron2.engine.defaults import default_writers
from detectron2.utils import comm

from spade.engine.trainer import SPADETrainer

from .builder import (
    TrainableWeightsIO,
    build_calibration_test_loader,
    build_calibration_train_loader,
    build_teacher_cache,
    calibration_items,
    calibration_record_of,
    novel_names,
)
from .model import CalibrationModel

__all__ = ["CalibrationTrainer", "heldout_calibration_loss"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def heldout_calibration_loss(model: CalibrationModel, data_loader) -> Dict[str, float]:
    """Mean L_cal over the held-out images (each rank its shard; gathered over all ranks)."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in data_loader:
            n = sum(len(d["triplets"]) for d in batch)
            if n == 0:
                continue
            total += float(model(batch)["loss_cal"]) * n
            count += n
    finally:
        model.train(was_training)
    gathered = comm.all_gather((total, count))
    total, count = sum(g[0] for g in gathered), sum(g[1] for g in gathered)
    return {"heldout_loss_cal": total / count if count else float("nan"), "heldout_triplets": count}


class CalibrationTrainer(SPADETrainer):
    """Trains LoRA + the MLP adapter against cached teacher maps (see module docstring)."""

    def build_model(self, cfg) -> CalibrationModel:
        """The calibration model, with the teacher-map cache filled for its items."""
        model = CalibrationModel(cfg)
        self.calibration_model = model
        self.cache = build_teacher_cache(cfg, model)
        self.train_items = calibration_items(
            cfg, cfg.DATASETS.TRAIN[0], max_images=int(cfg.CALIBRATION.MAX_TRAIN_IMAGES)
        )
        if not self.train_items:
            raise ValueError(f"dataset {cfg.DATASETS.TRAIN[0]!r} has no image with relations")
        eval_name = cfg.CALIBRATION.EVAL_DATASET or (
            cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else ""
        )
        # held out: the same vocabulary as training (the novel names of the training set's
        # open-vocabulary split reach no teacher prompt, not even the held-out ones)
        self.eval_items = (
            calibration_items(
                cfg,
                eval_name,
                max_images=int(cfg.CALIBRATION.MAX_EVAL_IMAGES),
                exclude_names=novel_names(cfg.DATASETS.TRAIN[0]),
            )
            if eval_name
            else []
        )
        self.last_eval: Dict[str, Dict[str, float]] = {}
        self.precompute_teacher_maps()
        model.train()
        model.vae.eval()
        model.clip_model.eval()
        return model

    def checkpoint_weights_io(self, model) -> TrainableWeightsIO:
        record = calibration_record_of(self.cfg.DATASETS.TRAIN[0], self.train_items)
        return TrainableWeightsIO(model.unet, model.implicit_text, record=record)

    def build_train_loader(self, cfg):
        return build_calibration_train_loader(cfg, self.train_items, self.cache)

    def precompute_teacher_maps(self) -> None:
        """Fill the cache for this rank's shard of train + held-out images, then synchronise."""
        items = self.train_items + [it for it in self.eval_items if it[1]]
        n = self.cache.precompute(items, comm.get_rank(), comm.get_world_size())
        logger.info("Teacher maps ready for %d images on rank %d", n, comm.get_rank())
        comm.synchronize()

    def build_hooks(self) -> List:
        cfg = self.cfg
        ret = [
            hooks.IterationTimer(),
            hooks.LRScheduler(),
            hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD),
        ]
        if self.eval_items:
            ret.append(hooks.EvalHook(cfg.CALIBRATION.EVAL_PERIOD, self.evaluate))
        if comm.is_main_process():
            writers = default_writers(cfg.OUTPUT_DIR, self.max_iter)
            ret.append(hooks.PeriodicWriter(writers, period=cfg.CALIBRATION.LOG_PERIOD))
        return ret

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Held-out L_cal, as ``{"calibration": {"heldout_loss_cal", "heldout_triplets"}}``."""
        loader = build_calibration_test_loader(self.cfg, self.eval_items, self.cache)
        result = heldout_calibration_loss(self.calibration_model, loader)
        logger.info("Held-out L_cal: %.6f over %d triplets", *result.values())
        self.last_eval = {"calibration": result}
        return self.last_eval

    def train(self) -> Dict[str, Dict[str, float]]:
        super().train()
        return self.last_eval

    def final_weights(self) -> str:
        """Path of the stage-2 input written after the last iteration."""
        return os.path.join(self.cfg.OUTPUT_DIR, "model_final.safetensors")
