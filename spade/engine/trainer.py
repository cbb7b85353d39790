"""The training loop of both SPADE stages, on detectron2's trainers.

- :class:`LossGuard`: a thin model wrapper (detectron2: "if you want to do something with the
  losses, you can wrap the model") that checks every loss term in training. A NaN/inf term stops
  training with a message naming the iteration and the term (``SOLVER.NONFINITE_LOSS = "raise"``),
  or the step is skipped and counted (``"skip"``: the terms are zeroed and
  :class:`SkipNonFiniteStep` drops the gradients before the optimizer step, on every rank).
  With ``SOLVER.AMP.ENABLED`` on a CPU model it also runs the forward under bf16 autocast
  (detectron2's AMPTrainer needs CUDA), with every GroupNorm fed contiguous input
  (:func:`contiguous_group_norm_inputs`) and attention on PyTorch's math kernel (its CPU
  flash-attention backward is several times slower in bf16 than in fp32: 1.48 vs 0.24 s in a
  step of the tiny CLIP, whose math-kernel matmuls run on the CPU's bf16 units instead).
- :func:`build_train_loop`: the SimpleTrainer / AMPTrainer that DefaultTrainer would choose, over
  detectron2's ``create_ddp_model`` (``device_ids=None`` for a CPU module under GLOO) and the guard.
- :class:`SPADETrainer`: a DefaultTrainer using the loop above, SPADE's optimizer builder and the
  safetensors checkpointer. Stage 2 (train_net.py) and stage 1
  (:class:`spade.calibration.CalibrationTrainer`) subclass it and override only the builders
  they need.
"""

import contextlib
import logging
import weakref
from typing import Dict, Optional

import torch
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer
from detectron2.engine.defaults import create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .checkpoint import SafetensorsCheckpointer
from .optimizer import build_spade_optimizer

__all__ = [
    "LossGuard",
    "NonFiniteLossError",
    "SkipNonFiniteStep",
    "SPADETrainer",
    "build_train_loop",
    "check_losses_finite",
    "contiguous_group_norm_inputs",
]

logger = logging.getLogger(__name__)

NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite."""


def check_losses_finite(loss_dict: Dict[str, torch.Tensor], iteration: int) -> None:
    """Raise NonFiniteLossError naming ``iteration`` and every non-finite term of ``loss_dict``."""
    bad = {k: float(v.detach()) for k, v in loss_dict.items() if not torch.isfinite(v).all()}
    if bad:
        terms = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        raise NonFiniteLossError(
            f"Non-finite loss at iteration {iteration}: {terms}. "
            "Lower SOLVER.BASE_LR, check the data, or set SOLVER.NONFINITE_LOSS=skip."
        )


def _current_iteration() -> int:
    try:
        return get_event_storage().iter
    except AssertionError:  # called outside a training loop
        return -1


def _contiguous_first_input(module, args):
    return (args[0].contiguous(),) + tuple(args[1:])


def contiguous_group_norm_inputs(model: nn.Module) -> int:
    """Make every ``nn.GroupNorm`` of ``model`` see a contiguous (NCHW) input; returns how many.

    Under CPU bf16 autocast, oneDNN's convolutions return channels-last tensors for some inputs
    (e.g. a 3-channel image), and the layout then flows through the element-wise ops to the next
    GroupNorm, whose CPU backward is about 10x slower on channels-last bf16 than on contiguous
    input (measured on a 32 x 32 x 64 x 64 activation: 115 vs 8-14 ms). A forward pre-hook copies
    such inputs to the contiguous layout (a no-op for contiguous ones); the result is the same up
    to float rounding (the kernels sum in another order).
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            m.register_forward_pre_hook(_contiguous_first_input)
            n += 1
    return n


class LossGuard(nn.Module):
    """Wraps a model whose training forward returns a dict of losses (see module doc).

    Args:
        model: the model (or its DistributedDataParallel wrapper).
        nonfinite_policy: "raise" or "skip".
        autocast_dtype: run the forward under ``torch.autocast("cpu", autocast_dtype)``
            (CPU AMP; GroupNorm inputs are made contiguous, see
            :func:`contiguous_group_norm_inputs`); None = no autocast.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        nonfinite_policy: str = "raise",
        autocast_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if nonfinite_policy not in NONFINITE_POLICIES:
            raise ValueError(
                f"SOLVER.NONFINITE_LOSS must be raise or skip, got {nonfinite_policy!r}"
            )
        self.model = model
        self.nonfinite_policy = nonfinite_policy
        self.autocast_dtype = autocast_dtype
        if autocast_dtype is not None:
            contiguous_group_norm_inputs(model)
        self.skipped_steps = 0
        self.skip_pending = False

    def forward(self, *args, **kwargs):
        if not self.training:
            return self.model(*args, **kwargs)
        amp = self.autocast_dtype is not None
        with torch.autocast("cpu", dtype=self.autocast_dtype or torch.bfloat16, enabled=amp):
            with sdpa_kernel(SDPBackend.MATH) if amp else contextlib.nullcontext():
                losses = self.model(*args, **kwargs)
        if not isinstance(losses, dict):
            return losses
        try:
            check_losses_finite(losses, _current_iteration())
        except NonFiniteLossError as e:
            if self.nonfinite_policy == "raise":
                raise
            self.skipped_steps += 1
            self.skip_pending = True
            logger.warning(f"{e} Step skipped ({self.skipped_steps} so far).")
            return {
                k: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) for k, v in losses.items()
            }
        return losses


class SkipNonFiniteStep(HookBase):
    """After backward: drop every gradient of a step the :class:`LossGuard` skipped on any rank.

    Parameters without a gradient are left untouched by the optimizer (no update, no weight decay,
    no moment update). Under CUDA AMP the gradients are set to NaN instead, so that the
    GradScaler skips the step as it does on overflow.
    """

    def __init__(self, guard: LossGuard):
        self.guard = guard

    def after_backward(self):
        skip = self.guard.skip_pending
        if comm.get_world_size() > 1:
            skip = any(comm.all_gather(skip))
        self.guard.skip_pending = False
        if not skip:
            return
        scaler = getattr(self.trainer, "grad_scaler", None)
        for group in self.trainer.optimizer.param_groups:
            for p in group["params"]:
                if scaler is not None and scaler.is_enabled() and p.grad is not None:
                    p.grad.fill_(float("nan"))
                else:
                    p.grad = None


def build_train_loop(cfg, model: nn.Module, data_loader, optimizer) -> SimpleTrainer:
    """The inner loop DefaultTrainer would build, with the loss guard and CPU-capable DDP.

    AMPTrainer when SOLVER.AMP.ENABLED on CUDA; on CPU, SimpleTrainer with bf16 autocast inside
    the guard. Parameters that get no gradient in a step (e.g. a LoRA factor no captured map
    depends on) are allowed under DDP (``find_unused_parameters``).
    """
    on_cuda = next(model.parameters()).is_cuda
    model = create_ddp_model(
        model,
        broadcast_buffers=False,
        find_unused_parameters=True,
        device_ids=[comm.get_local_rank()] if on_cuda else None,
    )
    amp = bool(cfg.SOLVER.AMP.ENABLED)
    guard = LossGuard(
        model,
        nonfinite_policy=str(cfg.SOLVER.NONFINITE_LOSS),
        autocast_dtype=torch.bfloat16 if amp and not on_cuda else None,
    )
    loop = (AMPTrainer if amp and on_cuda else SimpleTrainer)(guard, data_loader, optimizer)
    loop.register_hooks([SkipNonFiniteStep(guard)])
    return loop


class SPADETrainer(DefaultTrainer):
    """DefaultTrainer with the guarded loop, SPADE's optimizer and safetensors checkpoints.

    The construction order is DefaultTrainer's: build_model, build_optimizer, build_train_loader,
    the inner loop, build_lr_scheduler, the checkpointer, build_hooks.
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        self.cfg = cfg
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        self._trainer = build_train_loop(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafetensorsCheckpointer(
            model,
            cfg.OUTPUT_DIR,
            weights_io=self.checkpoint_weights_io(model),
            allow_partial=bool(cfg.MODEL.SPADE.ALLOW_PARTIAL_CHECKPOINT),
            trainer=weakref.proxy(self),
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.register_hooks(self.build_hooks())

    def checkpoint_weights_io(self, model):
        """The stage's own weights format for the checkpointer (None: flat state dict)."""
        return None

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_spade_optimizer(cfg, model)
