"""Stage-2 entry point end to end: 2 CPU processes (GLOO), kill -9 and --resume.

These run ``projects/SPADE/train_net.py`` as users do, in subprocesses, on a micro config (the
instant config shrunk further through command-line opts) and a 24-image SynthPSG.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "projects", "SPADE", "train_net.py")
INSTANT = os.path.join(ROOT, "configs", "quick_schedules", "spade_instant_test.yaml")
MICRO_OPTS = [
    "MODEL.SPADE.MASK_HEAD.NUM_OBJECT_QUERIES",
    "8",
    "MODEL.SPADE.MASK_HEAD.DEC_LAYERS",
    "2",
    "MODEL.SPADE.MASK_HEAD.TRAIN_NUM_POINTS",
    "128",
    "MODEL.SPADE.RELATION.NUM_PAIRS",
    "16",
    "INPUT.IMAGE_SIZE",
    "64",
    "SOLVER.IMS_PER_BATCH",
    "2",
]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")


def _cmd(out_dir, data_dir, *extra, num_gpus=1):
    return [
        sys.executable,
        TRAIN_NET,
        "--config-file",
        INSTANT,
        "--num-gpus",
        str(num_gpus),
        *[a for a in extra if a.startswith("--")],
        "OUTPUT_DIR",
        str(out_dir),
        "DATASETS.SYNTHPSG.ROOT",
        str(data_dir),
        *MICRO_OPTS,
        *[a for a in extra if not a.startswith("--")],
    ]


def _run(cmd, timeout=600):
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _iteration_of(state_file):
    import torch

    return torch.load(state_file, map_location="cpu", weights_only=True)["iteration"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from spade.data.synthpsg import ensure_synthpsg

    root = tmp_path_factory.mktemp("synthpsg_micro") / "data"
    ensure_synthpsg(str(root), num_images=24, seed=0, size=64)
    return root


def test_two_cpu_processes_train_checkpoint_once_and_gather_evaluation(tmp_path, data_dir):
    out = tmp_path / "ddp"
    log = _run(
        _cmd(
            out,
            data_dir,
            "SOLVER.MAX_ITER",
            "4",
            "SOLVER.CHECKPOINT_PERIOD",
            "2",
            "TEST.EVAL_PERIOD",
            "4",
            num_gpus=2,
        )
    )
    assert "World size: 2" in log
    files = sorted(os.listdir(out))
    # written once, by the main process only: no stray temp files, no per-rank copies
    ckpts = [f for f in files if f.endswith((".safetensors", ".state.pth"))]
    assert ckpts == [
        "model_0000001.safetensors",
        "model_0000001.state.pth",
        "model_0000003.safetensors",
        "model_0000003.state.pth",
        "model_final.safetensors",
        "model_final.state.pth",
    ]
    assert not [f for f in files if f.endswith(".tmp")]
    assert (out / "last_checkpoint").read_text() == "model_final.safetensors"
    assert _iteration_of(out / "model_final.state.pth") == 3

    # evaluation gathered from both ranks equals a single-process evaluation of the same weights
    res2 = json.loads((out / "inference" / "synthpsg_val" / "psg_evaluation.json").read_text())
    single = tmp_path / "single"
    _run(
        _cmd(single, data_dir, "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.safetensors"))
    )
    res1 = json.loads((single / "inference" / "synthpsg_val" / "psg_evaluation.json").read_text())
    n_val = sum(1 for i in range(24) if i % 10 == 7)
    assert res2["psg"]["num_images_strict"] == n_val
    assert res1["psg"]["num_images_strict"] == n_val
    for key in ("R@50", "mR@50", "R@50_strict", "ngR@50"):
        a, b = res1["psg"][key], res2["psg"][key]
        assert (a != a and b != b) or a == pytest.approx(b), key  # NaN == NaN here
    assert res1["panoptic_seg"]["PQ"] == pytest.approx(res2["panoptic_seg"]["PQ"])


def test_kill_minus_nine_then_resume_finishes_all_iterations(tmp_path, data_dir):
    out = tmp_path / "resume"
    max_iter = 60  # long enough after the iteration-7 checkpoint that the kill lands mid-run
    cmd = _cmd(out, data_dir, "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "4")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    target = out / "model_0000007.state.pth"
    deadline = time.time() + 540
    try:
        while not target.exists():
            assert proc.poll() is None, "training ended before the kill"
            assert time.time() < deadline, "no checkpoint at iteration 7 in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no warning, possibly mid-write of the next checkpoint
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "model_final.safetensors").exists()
    last = (out / "last_checkpoint").read_text()
    saved = int(last[len("model_") : -len(".safetensors")])
    # The kill can land between iteration 7's state file and its re-tagging of last_checkpoint,
    # which then still names iteration 3's checkpoint: complete, and the one to resume from.
    assert 3 <= saved < max_iter - 1 and (saved + 1) % 4 == 0, last
    assert (out / last).is_file() and (out / last.replace(".safetensors", ".state.pth")).is_file()

    log = _run(cmd[:4] + ["--resume"] + cmd[4:])
    resumed_from = _iteration_of(out / last.replace(".safetensors", ".state.pth")) + 1
    assert f"Starting training from iteration {resumed_from}" in log
    assert (out / "last_checkpoint").read_text() == "model_final.safetensors"
    assert _iteration_of(out / "model_final.state.pth") == max_iter - 1
