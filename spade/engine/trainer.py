"""Training loop pieces shared by SPADE's entry points.

- :func:`create_ddp_model`: DistributedDataParallel that also works for CPU modules under GLOO
  (detectron2's version always passes ``device_ids``, which DDP rejects for a CPU module).
- :class:`GuardedTrainer`: detectron2's SimpleTrainer plus a check of every loss term before the
  backward pass: a NaN/inf term stops training with a message naming the iteration and the term
  (``SOLVER.NONFINITE_LOSS = "raise"``), or the step is skipped and counted (``"skip"``).
- :class:`SPADETrainer`: a DefaultTrainer using the two above and the safetensors checkpointer.
  Entry points subclass it and override only the builders they need.
"""

import logging
import weakref
from typing import Dict

import torch
from detectron2.engine import DefaultTrainer, SimpleTrainer
from detectron2.engine.train_loop import TrainerBase
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn

from .checkpoint import SafetensorsCheckpointer
from .optimizer import build_spade_optimizer

__all__ = ["create_ddp_model", "GuardedTrainer", "SPADETrainer", "NonFiniteLossError"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite."""


def create_ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel when more than one process runs.

    On CUDA the local rank's device is used; a CPU module gets ``device_ids=None`` (GLOO).
    """
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs:
        on_cuda = next(model.parameters()).is_cuda
        kwargs["device_ids"] = [comm.get_local_rank()] if on_cuda else None
    return nn.parallel.DistributedDataParallel(model, **kwargs)


def check_losses_finite(loss_dict: Dict[str, torch.Tensor], iteration: int) -> None:
    """Raise NonFiniteLossError naming ``iteration`` and every non-finite term of ``loss_dict``."""
    bad = {k: float(v) for k, v in loss_dict.items() if not torch.isfinite(v).all()}
    if bad:
        terms = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        raise NonFiniteLossError(
            f"Non-finite loss at iteration {iteration}: {terms}. "
            "Lower SOLVER.BASE_LR, check the data, or set SOLVER.NONFINITE_LOSS=skip."
        )


class GuardedTrainer(SimpleTrainer):
    """SimpleTrainer that checks each loss term before backward (see module doc)."""

    def __init__(self, model, data_loader, optimizer, *, nonfinite_policy: str = "raise"):
        super().__init__(model, data_loader, optimizer)
        if nonfinite_policy not in ("raise", "skip"):
            raise ValueError(
                f"SOLVER.NONFINITE_LOSS must be raise or skip, got {nonfinite_policy!r}"
            )
        self.nonfinite_policy = nonfinite_policy
        self.skipped_steps = 0

    def run_step(self):
        assert self.model.training, "[GuardedTrainer] model was changed to eval mode!"
        import time

        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        try:
            check_losses_finite(loss_dict, self.iter)
        except NonFiniteLossError as e:
            if self.nonfinite_policy == "raise":
                raise
            self.skipped_steps += 1
            logger.warning(f"{e} Step skipped ({self.skipped_steps} so far).")
            self.optimizer.zero_grad()
            return
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


class SPADETrainer(DefaultTrainer):
    """DefaultTrainer with CPU-capable DDP, the loss guard and safetensors checkpoints."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False, find_unused_parameters=True)
        self._trainer = GuardedTrainer(
            model, data_loader, optimizer, nonfinite_policy=cfg.SOLVER.NONFINITE_LOSS
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafetensorsCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_spade_optimizer(cfg, model)
