"""The calibrate_net.py entry point: instant run, resume, two-process launch."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "projects", "SPADE", "calibrate_net.py")
CONFIG = os.path.join(ROOT, "configs", "calibration", "Instant-SynthPSG.yaml")


def _load_script():
    spec = importlib.util.spec_from_file_location("calibrate_net", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(script, out, data, *extra):
    """Parsed command line: flags (``--resume``) and opts (KEY VALUE pairs) from ``extra``."""
    flags = [e for e in extra if e.startswith("--")]
    opts = [e for e in extra if not e.startswith("--")]
    return script.argument_parser().parse_args(
        ["--config-file", CONFIG, *flags, "DATASETS.SYNTHPSG.ROOT", data, "OUTPUT_DIR", out, *opts]
    )


def _losses(out):
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    return {r["iteration"]: r["total_loss"] for r in rows if "total_loss" in r}, rows


def _tensors(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def instant_run(tmp_path_factory):
    """The 40-iteration instant calibration through calibrate_net.main, in process."""
    tmp = tmp_path_factory.mktemp("calib")
    out, data = str(tmp / "out"), str(tmp / "synthpsg")
    script = _load_script()
    trainers = []

    class Recording(script.CalibrationTrainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            trainers.append(self)
            unet = self.calibration_model.unet
            self.frozen_before = {
                n: p.detach().clone() for n, p in unet.named_parameters() if ".lora_" not in n
            }

    script.CalibrationTrainer = Recording
    result = script.main(_args(script, out, data))
    return script, trainers[0], result, out, data


def test_instant_calibration_lowers_loss_and_trains_only_lora_adapter(instant_run):
    _, trainer, result, out, _ = instant_run
    losses, rows = _losses(out)
    assert sorted(losses) == list(range(40))
    first = sum(losses[i] for i in range(5)) / 5
    last = sum(losses[i] for i in range(35, 40)) / 5
    assert last < 0.8 * first, (first, last)
    heldout = result["calibration"]["heldout_loss_cal"]
    assert 0 < heldout < 1 and result["calibration"]["heldout_triplets"] > 0
    # the held-out L_cal of the untrained model (--eval-only, no weights loaded) is higher
    script, _, _, _, data = instant_run
    initial = script.main(
        _args(script, out, data, "--eval-only", "CALIBRATION.NUM_VIS_IMAGES", "0")
    )
    assert heldout < initial["calibration"]["heldout_loss_cal"]
    assert any("calibration/heldout_loss_cal" in r for r in rows)
    # only LoRA (+ adapter) moved; the UNet's base weights are bit-identical
    unet = trainer.calibration_model.unet
    for name, p in unet.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(p, trainer.frozen_before[name]), name
    tensors, meta = _tensors(os.path.join(out, "model_final.safetensors"))
    assert tensors and all(k.startswith(("lora.", "adapter.")) for k in tensors)
    assert any(k.startswith("adapter.") for k in tensors)
    assert max(v.abs().max().item() for k, v in tensors.items() if "lora_B" in k) > 0  # B left 0
    assert meta["iteration"] == "39" and meta["format"] == "spade-trainable-v1"
    assert os.listdir(os.path.join(out, "visualization"))
    assert os.path.isfile(
        os.path.join(out, "teacher_maps", f"{trainer.train_items[0][0]['image_id']}.safetensors")
    )


def test_resume_continues_from_saved_iteration(instant_run):
    script, _, _, out, data = instant_run
    # simulate an interruption after the checkpoint of iteration 19
    for name in os.listdir(out):
        if name.startswith(("model_0000039", "model_final")):
            os.remove(os.path.join(out, name))
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000019")
    saved, _ = _tensors(os.path.join(out, "model_0000019.safetensors"))
    os.remove(os.path.join(out, "metrics.json"))
    resumed = script.main(_args(script, out, data, "--resume", "CALIBRATION.NUM_VIS_IMAGES", "0"))
    losses, _ = _losses(out)
    assert sorted(losses) == list(range(20, 40))  # continued at 20, not from 0
    final, meta = _tensors(os.path.join(out, "model_final.safetensors"))
    assert meta["iteration"] == "39"
    assert any(not torch.equal(final[k], saved[k]) for k in saved)
    state = torch.load(os.path.join(out, "model_final.state.pth"), weights_only=True)
    assert state["iteration"] == 39 and state["trainer"]["_trainer"]["optimizer"]["state"]
    # --eval-only on the final weights reproduces the held-out L_cal of the end of training
    final_path = os.path.join(out, "model_final.safetensors")
    evaluated = script.main(
        _args(
            script,
            out,
            data,
            "--eval-only",
            "MODEL.WEIGHTS",
            final_path,
            "CALIBRATION.NUM_VIS_IMAGES",
            "0",
        )
    )
    assert evaluated["calibration"]["heldout_loss_cal"] == pytest.approx(
        resumed["calibration"]["heldout_loss_cal"], rel=1e-5
    )


def test_two_process_cpu_launch(instant_run, tmp_path):
    _, _, _, out, data = instant_run
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        SCRIPT,
        "--config-file",
        CONFIG,
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        "DATASETS.SYNTHPSG.ROOT",
        data,
        "OUTPUT_DIR",
        str(tmp_path),
        "CALIBRATION.CACHE_DIR",
        os.path.join(out, "teacher_maps"),
        "SOLVER.MAX_ITER",
        "3",
        "SOLVER.CHECKPOINT_PERIOD",
        "100",
        "CALIBRATION.NUM_VIS_IMAGES",
        "0",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = open(os.path.join(tmp_path, "log.txt")).read()
    assert "World size: 2" in log
    tensors, meta = _tensors(os.path.join(tmp_path, "model_final.safetensors"))
    assert meta["iteration"] == "2" and tensors


def test_stage1_refuses_nonfinite_loss_like_stage2(instant_run):
    """Same engine as stage 2 (tests/engine/test_engine_stages.py): the LossGuard names the term."""
    from detectron2.utils.events import EventStorage

    from spade.engine import LossGuard, NonFiniteLossError, SPADETrainer

    _, trainer, _, _, _ = instant_run
    assert isinstance(trainer, SPADETrainer) and isinstance(trainer.model, LossGuard)
    model = trainer.calibration_model
    triplets = trainer.train_items[0][1]
    r = model.teacher.resolution
    batch = [
        {
            "image": torch.rand(3, 64, 64),
            "triplets": triplets,
            "teacher_maps": torch.zeros(len(triplets), 3, r, r),
        }
    ]
    lam, model.lambda_cal = model.lambda_cal, float("nan")
    try:
        with EventStorage(5), pytest.raises(NonFiniteLossError, match="iteration 5: loss_cal=nan"):
            trainer.model(batch)
    finally:
        model.lambda_cal = lam
