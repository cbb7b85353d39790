"""Stage-0 training on detectron2's engine: one trainer for the tiny CLIP, VAE and UNet.

:class:`PretrainTrainer` is a ``DefaultTrainer`` that overrides only what differs: the model and
its batches come from the task named by ``PRETRAIN.TASK`` (:data:`PRETRAIN_TASKS`), the optimizer
is AdamW over the trainable parameters, checkpoints are SPADE's safetensors ones, and a
:class:`WallClock` hook adds up training time across resumed runs (it goes into the manifest).
With ``SOLVER.AMP.ENABLED`` on a CUDA model detectron2's AMPTrainer runs; on the CPU (where
AMPTrainer refuses to run) the forward runs under bf16 autocast instead, as in SPADE's own stages
(:class:`spade.engine.LossGuard`); on CPUs with AMX / AVX-512-BF16 that made the stage-0 runs
1.3-2.5x faster, the CLIP region fine-tune 1.05x (``benchmarks/bench_pretrain.py``). With
``PRETRAIN.COMPILE`` the UNet is ``torch.compile``-d in place (:func:`compile_network`; the UNet
configs ask for it where a C++ compiler is found). Everything
else — LR schedule, ETA printing, metrics.json / TensorBoard, periodic checkpoints,
``--resume`` — is detectron2's.

A task is an object with ``build_model(cfg) -> nn.Module`` (``forward(batch)`` returns a loss
dict in training), ``batches(cfg, model) -> iterator of batches`` and
``export(cfg, model) -> str`` (writes the model in its standard format, returns the folder).
"""

from __future__ import annotations

import logging
import time
import warnings
import weakref
from typing import Dict, List

import torch
from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from spade.engine.checkpoint import SafetensorsCheckpointer
from spade.engine.trainer import LossGuard

__all__ = [
    "PRETRAIN_TASKS",
    "register_task",
    "PretrainTrainer",
    "WallClock",
    "WallBudget",
    "worker_batches",
    "compile_network",
]

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


class WallBudgetReached(Exception):
    """Raised by :class:`WallBudget` to end training early (caught by PretrainTrainer.train)."""


class WallBudget(HookBase):
    """Fits training into ``seconds`` (``PRETRAIN.MAX_WALL_SECONDS``), for a lent machine.

    After ``probe`` iterations it measures the speed; if MAX_ITER would not fit, it shortens the
    run to the iterations that fit and compresses the LR schedule with it (the cosine still
    anneals to its end). It also ends training outright if the time runs out anyway. The model
    is then exported as trained; the manifest records the iterations reached.
    """

    def __init__(self, seconds: float, probe: int = 100, skip: int = 20):
        self.seconds = float(seconds)
        self.probe, self.skip = int(probe), int(skip)  # speed from iterations (skip, probe]
        self.stop_at = None  # iterations after which training ends (None = MAX_ITER)
        self._start = self._mark = None

    def before_train(self):
        self._start = time.perf_counter()
        self._first = self.trainer.iter

    def after_step(self):
        now = time.perf_counter()
        elapsed = now - self._start
        done = self.trainer.iter + 1 - self._first
        if done == self.skip:
            self._mark = now  # the first iterations (warm-up, caches) do not set the speed
        if self.stop_at is None and done == self.probe and self._mark is not None:
            rate = (now - self._mark) / (self.probe - self.skip)
            fits = self.trainer.iter + 1 + int((self.seconds - elapsed) / rate)
            if fits < self.trainer.max_iter:
                self.stop_at = max(fits, self.trainer.iter + 1)
                scheduler = getattr(self.trainer, "scheduler", None)
                if hasattr(scheduler, "_max_iter"):  # detectron2's LRMultiplier
                    scheduler._max_iter = self.stop_at
                logger.info(
                    "PRETRAIN.MAX_WALL_SECONDS=%g: %.3f s/it, so %d of %d iterations fit; the LR "
                    "schedule is shortened to them",
                    self.seconds,
                    rate,
                    self.stop_at,
                    self.trainer.max_iter,
                )
        if self.stop_at is not None and self.trainer.iter + 1 >= self.stop_at:
            raise WallBudgetReached(
                f"PRETRAIN.MAX_WALL_SECONDS={self.seconds:g}: the {self.stop_at} iterations that "
                "fit are done"
            )
        if elapsed > self.seconds:
            raise WallBudgetReached(
                f"PRETRAIN.MAX_WALL_SECONDS={self.seconds:g} reached after iteration "
                f"{self.trainer.iter + 1} of {self.trainer.max_iter}"
            )


class _WorkerBatches(IterableDataset):
    def __init__(self, make):
        self.make = make

    def __iter__(self):
        info = get_worker_info()
        return iter(self.make(worker=info.id, num_workers=info.num_workers))


def worker_batches(make, num_workers: int):
    """Batches of ``make(worker=w, num_workers=n)`` (an endless batch iterator per worker),
    produced by ``num_workers`` data-loader processes in a fixed round-robin order, so the
    stream is deterministic; ``num_workers`` 0 runs ``make(worker=0, num_workers=1)`` in this
    process. ``make`` should be picklable (a functools.partial of a module-level function)."""
    if int(num_workers) <= 0:
        return make(worker=0, num_workers=1)
    loader = DataLoader(
        _WorkerBatches(make),
        batch_size=None,
        num_workers=int(num_workers),
        persistent_workers=True,
        prefetch_factor=4,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)


COMPILE_MODES = ("off", "on", "auto")


def _cpp_compiler() -> str:
    """The C++ compiler torch.compile's CPU backend would use, or "" when it finds none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return str(get_cpp_compiler())
    except Exception:  # inductor raises its own error types when no compiler is found
        return ""


def _compile_smoke_test() -> str:
    """ "" when torch.compile can build and run a CPU kernel here (compiler, Python headers),
    else why not (the error, one line)."""
    try:
        out = torch.compile(lambda x: x * 2.0 + 1.0)(torch.ones(4))
        if not torch.equal(out, torch.full((4,), 3.0)):
            return f"a compiled kernel computed {out.tolist()} instead of 3.0s"
        return ""
    except Exception as e:  # any failure of the toolchain: fall back to eager
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def compile_network(model, mode: str, device: str) -> List[str]:
    """``torch.compile`` the modules ``model`` names in its ``compile_modules`` attribute (the UNet
    task: its UNet) in place, per ``PRETRAIN.COMPILE`` = ``mode``; returns the names compiled.

    In place (``nn.Module.compile``): the state dict, checkpoints, exports and ``--resume`` see
    the same modules and keys as without it. The CLIP and VAE tasks name none (their training
    calls the networks' encode methods, which compiling ``forward`` would not reach): "auto"
    leaves them as they are, "on" is an error.
    """
    mode = str(mode).lower()
    if mode not in COMPILE_MODES:
        raise ValueError(f"PRETRAIN.COMPILE must be one of {COMPILE_MODES}, got {mode!r}")
    names = tuple(getattr(model, "compile_modules", ()))
    if mode == "off" or (mode == "auto" and not names):
        return []
    if not names:
        raise ValueError(
            f"PRETRAIN.COMPILE=on: {type(model).__name__} has nothing to compile (only the UNet "
            "task supports it); set PRETRAIN.COMPILE off or auto"
        )
    if mode == "auto":
        if str(device).startswith("cuda"):
            logger.info("PRETRAIN.COMPILE=auto: not compiling on CUDA (not measured there)")
            return []
        compiler = _cpp_compiler()
        failure = "" if not compiler else _compile_smoke_test()
        if not compiler or failure:
            logger.warning(
                "PRETRAIN.COMPILE=auto: %s, so %s trains uncompiled (slower; a working g++ "
                "and the Python headers let it compile)",
                "torch.compile finds no C++ compiler"
                if not compiler
                else f"torch.compile fails on a test kernel ({failure})",
                ", ".join(names),
            )
            return []
    for name in names:
        # static shapes: a run's shapes never change, and a second model compiled in the same
        # process (tests, --ab-compile) would otherwise turn them symbolic, where inductor can fail
        model.get_submodule(name).compile(dynamic=False)
    logger.info(
        "PRETRAIN.COMPILE=%s: %s compiled in place (the first step compiles, 1-4 min; cached "
        "after)",
        mode,
        ", ".join(names),
    )
    return list(names)


class PretrainTrainer(DefaultTrainer):
    """DefaultTrainer for ``PRETRAIN.TASK`` (see module doc)."""

    def __init__(self, cfg):
        from spade.utils.manifest import code_commit

        self.wall_clock = WallClock()
        self.code_commit = code_commit()  # the code this run trains with (not the export's HEAD)
        cpu_amp = cfg.SOLVER.AMP.ENABLED and not str(cfg.MODEL.DEVICE).startswith("cuda")
        with warnings.catch_warnings():
            if cpu_amp:  # the AMPTrainer replaced below warns that its CUDA grad scaler is off
                warnings.filterwarnings("ignore", message=".*GradScaler is enabled, but CUDA")
            super().__init__(cfg)
        if cpu_amp:
            # DefaultTrainer chose AMPTrainer, which needs CUDA: the same loop with the forward
            # under bf16 autocast instead (no grad scaler: bf16 has fp32's exponent range). The
            # checkpointer built above keeps the unwrapped model.
            inner = self._trainer
            self._trainer = SimpleTrainer(
                LossGuard(inner.model, autocast_dtype=torch.bfloat16),
                inner.data_loader,
                inner.optimizer,
            )
            logger.info("SOLVER.AMP.ENABLED on the CPU: the forward runs under bf16 autocast")

    @classmethod
    def build_model(cls, cfg):
        model = get_task(cfg).build_model(cfg)
        model.to(torch.device(cfg.MODEL.DEVICE))
        compile_network(model, cfg.PRETRAIN.COMPILE, cfg.MODEL.DEVICE)
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
        if float(self.cfg.PRETRAIN.MAX_WALL_SECONDS) > 0:
            hooks.insert(2, WallBudget(self.cfg.PRETRAIN.MAX_WALL_SECONDS))
        return hooks

    def train(self):
        try:
            return super().train()
        except WallBudgetReached as e:
            # detectron2 left iter at the failing step; the last finished one is iter
            self.iter += 1
            logger.info("%s: training ends here", e)
            return None

    def build_writers(self):
        from detectron2.engine.defaults import default_writers

        return default_writers(self.cfg.OUTPUT_DIR, self.max_iter)

    def unwrapped_model(self):
        model = self.model
        if isinstance(model, LossGuard):
            model = model.model
        return model.module if hasattr(model, "module") else model
