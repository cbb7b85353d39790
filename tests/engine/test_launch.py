"""Bad input inside detectron2's launch: the same one line and exit status 2 with any number of
processes (spade.engine.launch)."""

import argparse
import os
import subprocess
import sys

import pytest

from spade.engine.launch import WorkerInputError, launch_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(ROOT, "projects", "SPADE", "train_net.py")
INSTANT = os.path.join(ROOT, "configs", "quick_schedules", "spade_instant_test.yaml")
LINE = "train_net.py: error: MODEL.SPADE.RELATION.ETA = 2.0 must be in [-1.0, 1.0]"


def _args(debug=False):
    return argparse.Namespace(
        num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto", debug=debug
    )


def _bad_main(args):
    raise FileNotFoundError("no/psg.json: annotation file\n  does not exist")


def test_one_process_bad_input_becomes_one_line():
    with pytest.raises(WorkerInputError, match=r"^no/psg.json: annotation file does not exist$"):
        launch_main(_bad_main, _args())
    with pytest.raises(FileNotFoundError):  # --debug: the original error, traceback and all
        launch_main(_bad_main, _args(debug=True))


@pytest.mark.parametrize("num_gpus", [1, 2])
def test_bad_input_in_workers_is_one_line_and_exit_2(tmp_path, num_gpus):
    cmd = [sys.executable, TRAIN_NET, "--config-file", INSTANT, "--num-gpus", str(num_gpus)]
    cmd += ["--dist-url", "auto", "OUTPUT_DIR", str(tmp_path), "MODEL.SPADE.RELATION.ETA", "2.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == LINE
    assert proc.stderr.count(LINE) == 1
