"""Stage-1 calibration trainer on detectron2's SimpleTrainer and hooks.

Order of work in :class:`CalibrationTrainer`:

1. build the CalibrationModel (frozen VAE / UNet / CLIP, LoRA, implicit text encoder);
2. fingerprint the teacher and fill the teacher-map cache for the training and held-out images,
   each rank computing its shard ``items[rank::world_size]``, then wait for all ranks: the cache
   is complete before any trained weight exists (so the full fine-tuning ablation, which changes
   the UNet itself, still gets maps from the untouched teacher);
3. train only the trainable parameters (LoRA / attn2 + MLP adapter) with AdamW, wrapped in
   DistributedDataParallel (``device_ids=None`` on CPU) when several processes run;
4. hooks: IterationTimer, LRScheduler, PeriodicCheckpointer (trainable safetensors + tensor-only
   trainer state), EvalHook (held-out L_cal, mean over all ranks), PeriodicWriter (console,
   metrics.json, TensorBoard).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List

import torch
from detectron2.engine import SimpleTrainer, hooks
from detectron2.engine.defaults import default_writers
from detectron2.solver import build_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm

from spade.engine.trainer import create_ddp_model

from .builder import (
    build_calibration_test_loader,
    build_calibration_train_loader,
    build_teacher_cache,
    calibration_items,
)
from .checkpoint import CalibrationCheckpointer
from .model import CalibrationModel

__all__ = ["CalibrationTrainer", "build_calibration_optimizer", "heldout_calibration_loss"]

logger = logging.getLogger(__name__)


def build_calibration_optimizer(cfg, model: CalibrationModel) -> torch.optim.Optimizer:
    """AdamW (or SGD, SOLVER.OPTIMIZER) over the trainable parameters only."""
    params = model.trainable_parameters()
    if not params:
        raise ValueError("the calibration model has no trainable parameters")
    name = str(cfg.SOLVER.OPTIMIZER).upper()
    kwargs = {"lr": cfg.SOLVER.BASE_LR, "weight_decay": cfg.SOLVER.WEIGHT_DECAY}
    if name == "ADAMW":
        cls = torch.optim.AdamW
    elif name == "SGD":
        cls, kwargs["momentum"] = torch.optim.SGD, cfg.SOLVER.MOMENTUM
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
    return maybe_add_gradient_clipping(cfg, cls)(params, **kwargs)


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


class CalibrationTrainer(SimpleTrainer):
    """Trains LoRA + the MLP adapter against cached teacher maps (see module docstring)."""

    def __init__(self, cfg):
        self.cfg = cfg
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
        self.eval_items = (
            calibration_items(cfg, eval_name, max_images=int(cfg.CALIBRATION.MAX_EVAL_IMAGES))
            if eval_name
            else []
        )
        self.precompute_teacher_maps()

        model.train()
        model.vae.eval()
        model.clip_model.eval()
        optimizer = build_calibration_optimizer(cfg, model)
        # the last attn2 layer's to_v / to_out LoRA cannot change any captured map, so it gets
        # no gradient from L_cal: let DDP skip such parameters
        ddp_model = create_ddp_model(model, broadcast_buffers=False, find_unused_parameters=True)
        loader = build_calibration_train_loader(cfg, self.train_items, self.cache)
        super().__init__(ddp_model, loader, optimizer)
        self.scheduler = build_lr_scheduler(cfg, optimizer)
        self.checkpointer = CalibrationCheckpointer(
            model,
            cfg.OUTPUT_DIR,
            trainer=self,  # trainer state: iteration, optimizer, LR
        )
        self.start_iter = 0
        self.last_eval: Dict[str, Dict[str, float]] = {}
        self.max_iter = int(cfg.SOLVER.MAX_ITER)
        self.register_hooks(self.build_hooks())

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

    def resume_or_load(self, resume: bool = True) -> None:
        """Continue from the last checkpoint in OUTPUT_DIR (``resume``) or load MODEL.WEIGHTS."""
        self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1

    def train(self) -> None:
        super().train(self.start_iter, self.max_iter)

    def final_weights(self) -> str:
        """Path of the stage-2 input written after the last iteration."""
        return os.path.join(self.cfg.OUTPUT_DIR, "model_final.safetensors")
