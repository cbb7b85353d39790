"""The shared engine on both stages: AMP on CPU (bf16) with the instant config, the same
non-finite loss refusal, and one checkpoint layout for stage 1 and stage 2."""

import argparse
import importlib.util
import os

import pytest
import torch
from detectron2.utils.events import EventStorage

from spade.engine import LossGuard, NonFiniteLossError, SPADETrainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTANT = os.path.join(ROOT, "configs", "quick_schedules", "spade_instant_test.yaml")


def assert_checkpoint_layout(out_dir: str, name: str, iteration: int) -> None:
    """The two-file checkpoint both stages write (see spade/engine/checkpoint.py)."""
    from safetensors import safe_open

    weights = os.path.join(out_dir, f"{name}.safetensors")
    with safe_open(weights, framework="pt") as f:
        assert f.metadata()["iteration"] == str(iteration)
        assert list(f.keys())
    state = torch.load(os.path.join(out_dir, f"{name}.state.pth"), weights_only=True)
    assert state["iteration"] == iteration
    assert state["trainer"]["_trainer"]["optimizer"]["state"]
    assert open(os.path.join(out_dir, "last_checkpoint")).read() == f"{name}.safetensors"


def assert_refuses_nonfinite_loss(trainer: SPADETrainer, poison) -> None:
    """Poison the model's losses with NaN: the step raises naming the iteration and term."""
    assert isinstance(trainer.model, LossGuard)
    inner = trainer.model.model
    forward = inner.forward
    inner.forward = lambda batch: {k: v * float("nan") for k, v in forward(batch).items()}
    try:
        trainer.iter = trainer._trainer.iter = 5
        with (
            EventStorage(5),
            pytest.raises(NonFiniteLossError, match=rf"iteration 5: {poison}=nan"),
        ):
            trainer.run_step()
    finally:
        del inner.forward


def _train_net():
    spec = importlib.util.spec_from_file_location(
        "train_net_stages", os.path.join(ROOT, "projects", "SPADE", "train_net.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def amp_trainer(tmp_path_factory):
    from spade.data.synthpsg import ensure_synthpsg
    from spade.engine.defaults import setup_cfg

    tmp = tmp_path_factory.mktemp("amp")
    data = str(tmp / "synthpsg")
    ensure_synthpsg(data, num_images=24, seed=0, size=64)
    opts = [
        "OUTPUT_DIR", str(tmp / "out"),
        "DATASETS.SYNTHPSG.ROOT", data,
        "DATASETS.TEST", "()",
        "SOLVER.AMP.ENABLED", "True",
        "SOLVER.MAX_ITER", "3",
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "MODEL.SPADE.MASK_HEAD.NUM_OBJECT_QUERIES", "8",
        "MODEL.SPADE.MASK_HEAD.DEC_LAYERS", "2",
        "MODEL.SPADE.MASK_HEAD.TRAIN_NUM_POINTS", "128",
        "MODEL.SPADE.RELATION.NUM_PAIRS", "16",
    ]  # fmt: skip
    cfg = setup_cfg(argparse.Namespace(config_file=INSTANT, opts=opts), do_default_setup=False)
    trainer = _train_net().Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer, cfg.OUTPUT_DIR


def test_amp_on_cpu_trains_instant_config_in_bf16(amp_trainer):
    trainer, out = amp_trainer
    assert trainer.model.autocast_dtype == torch.bfloat16
    assert type(trainer._trainer).__name__ == "SimpleTrainer"  # AMPTrainer needs CUDA
    assert trainer.iter == 3  # after the loop: MAX_ITER
    history = trainer.storage.history("total_loss").values()
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(v)) for v, _ in history)
    assert_checkpoint_layout(out, "model_final", 2)


def test_stage2_refuses_nonfinite_loss(amp_trainer):
    trainer, _ = amp_trainer
    assert_refuses_nonfinite_loss(trainer, "loss_ce")
