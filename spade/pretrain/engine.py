"""Stage-0 training on detectron2's engine: one trainer for the tiny CLIP, VAE and UNet.

:class:`PretrainTrainer` is a ``DefaultTrainer`` that overrides only what differs: the model and
its batches come from the task named by ``PRETRAIN.TASK`` (:data:`PRETRAIN_TASKS`), the optimizer
is AdamW over the trainable parameters, checkpoints are SPADE's safetensors ones, and a
:class:`WallClock` hook adds up training time across resumed runs (it goes into the manifest).
Everything else — AMP choice, LR schedule, ETA printing, metrics.json / TensorBoard, periodic
checkpoints, ``--resume`` — is detectron2's.

A task is an object with ``build_model(cfg) -> nn.Module`` (``forward(batch)`` returns a loss
dict in training), ``batches(cfg, model) -> iterator of batches`` and
``export(cfg, model) -> str`` (writes the model in its standard format, returns the folder).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Dict

import torch
from detectron2.engine import DefaultTrainer, HookBase

from spade.engine.checkpoint import SafetensorsCheckpointer

__all__ = ["PRETRAIN_TASKS", "register_task", "PretrainTrainer", "WallClock"]

logger = logging.getLogger(__name__)

PRETRAIN_TASKS: Dict[str, object] = {}


def register_task(name: str):
    """Class decorator: ``PRETRAIN.TASK: name`` selects an instance of the class."""

    def wrap(cls):
        PRETRAIN_TASKS[name] = cls()
        return cls

    return wrap


def get_task(cfg):
    name = str(cfg.PRETRAIN.TASK)
    if name not in PRETRAIN_TASKS:
        raise ValueError(f"PRETRAIN.TASK={name!r}: expected one of {sorted(PRETRAIN_TASKS)}")
    return PRETRAIN_TASKS[name]


class WallClock(HookBase):
    """Adds up wall-clock seconds of training; the sum survives checkpoints and resumes."""

    def __init__(self):
        self.seconds = 0.0
        self._start = None

    def before_train(self):
        self._start = time.perf_counter()

    def after_step(self):
        now = time.perf_counter()
        self.seconds += now - self._start
        self._start = now

    def state_dict(self):
        return {"seconds": torch.tensor(self.seconds, dtype=torch.float64)}

    def load_state_dict(self, state):
        self.seconds = float(state["seconds"])


class PretrainTrainer(DefaultTrainer):
    """DefaultTrainer for ``PRETRAIN.TASK`` (see module doc)."""

    def __init__(self, cfg):
        from spade.utils.manifest import code_commit

        self.wall_clock = WallClock()
        self.code_commit = code_commit()  # the code this run trains with (not the export's HEAD)
        super().__init__(cfg)

    @classmethod
    def build_model(cls, cfg):
        model = get_task(cfg).build_model(cfg)
        model.to(torch.device(cfg.MODEL.DEVICE))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(
            "PRETRAIN.TASK=%s: %.2fM trainable parameters", cfg.PRETRAIN.TASK, n_train / 1e6
        )
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, betas=(0.9, 0.98)
        )

    @classmethod
    def build_train_loader(cls, cfg):
        return get_task(cfg).batches(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        raise NotImplementedError("stage-0 models are evaluated by spade.pretrain.gates")

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        return {}

    def build_hooks(self):
        self.checkpointer = SafetensorsCheckpointer(
            self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        hooks = super().build_hooks()
        hooks.insert(1, self.wall_clock)
        return hooks

    def build_writers(self):
        from detectron2.engine.defaults import default_writers

        return default_writers(self.cfg.OUTPUT_DIR, self.max_iter)

    def unwrapped_model(self):
        model = self.model
        return model.module if hasattr(model, "module") else model
