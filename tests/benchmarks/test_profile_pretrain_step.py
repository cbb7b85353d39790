"""benchmarks/profile_pretrain_step.py: one grounded UNet step of a miniature config (the
shipped CLIP and VAE, a tiny UNet, 24 corpus images), timed and profiled."""

import json
import os
import sys

import pytest
from bench_modules import ROOT, load_benchmark

sys.path.insert(0, os.path.join(ROOT, "tests", "pretrain"))
from pretrain_helpers import TINY_OPTS  # noqa: E402

profile_step = load_benchmark("profile_pretrain_step")


def _argv(tmp_path, *extra):
    return [
        "--config-file", os.path.join(ROOT, "configs", "pretrain", "unet_tiny_grounded5.yaml"),
        *extra,
        *TINY_OPTS,
        "PRETRAIN.CORPUS.ROOT", str(tmp_path / "corpus"),
        "PRETRAIN.UNET.CLIP", os.path.join(ROOT, "models", "synthpsg-tiny-clip"),
        "PRETRAIN.UNET.VAE", os.path.join(ROOT, "models", "synthpsg-tiny-sd"),
        "PRETRAIN.UNET.LATENT_CACHE", str(tmp_path / "latents.npy"),
        "PRETRAIN.UNET.SEGMENT_CACHE", str(tmp_path / "segments.npy"),
        "OUTPUT_DIR", str(tmp_path / "out"),
        "SOLVER.AMP.ENABLED", "True",  # as `make pretrain` trains on the CPU
    ]  # fmt: skip


def test_profiles_a_grounded_step_and_writes_json(tmp_path, capsys):
    out = tmp_path / "profile.json"
    argv = _argv(tmp_path, "--warmup", "1", "--steps", "1", "--top", "5", "--out", str(out))
    assert profile_step.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["config"] == "unet_tiny_grounded5.yaml"
    assert result["batch"] == 4 and result["amp"] is True
    assert result["step_s"] > 0 and result["data_s"] >= 0
    ops = result["ops"]
    assert len(ops) == 5 and all(o["calls"] >= 1 for o in ops)
    shares = [o["share"] for o in ops]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0
    assert all(o["self_ms_per_step"] >= 0 for o in ops)
    printed = capsys.readouterr().out
    assert printed.startswith("unet_tiny_grounded5.yaml: batch 4, amp True")
    table = printed.split("| op | calls | self ms / step | share |\n|---|---|---|---|\n")[1]
    assert [row.split(" | ")[0][2:] for row in table.strip().split("\n")] == [o["op"] for o in ops]


def test_rejects_no_steps(tmp_path):
    with pytest.raises(ValueError, match="--steps"):
        profile_step.main(_argv(tmp_path, "--steps", "0"))
