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


def _compiler() -> str:
    from spade.pretrain.engine import _cpp_compiler

    return _cpp_compiler()


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


@pytest.mark.skipif(not _compiler(), reason="torch.compile finds no C++ compiler")
def test_ab_compile_interleaves_eager_and_compiled_from_the_same_weights(tmp_path, capsys):
    out = tmp_path / "ab.json"
    argv = _argv(tmp_path, "--ab-compile", "--warmup", "1", "--steps", "2", "--out", str(out))
    assert profile_step.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["batch"] == 4 and result["amp"] is True
    assert result["eager_step_s"] > 0 and result["compiled_step_s"] > 0
    assert result["speedup"] == pytest.approx(
        result["eager_step_s"] / result["compiled_step_s"], rel=0.01
    )
    # the same batches, noise and start: the two copies train alike (bf16 rounding apart; in
    # the first steps of a tiny model AdamW makes it up to about 20 % of the update)
    assert 0 <= result["max_loss_rel_diff"] < 0.02
    assert result["update_cosine"] > 0.9 and 0 <= result["update_rel_diff"] < 0.5
    printed = capsys.readouterr().out
    assert printed.startswith("unet_tiny_grounded5.yaml: batch 4, amp True")
    assert f"| {result['speedup']:.2f}x |" in printed
