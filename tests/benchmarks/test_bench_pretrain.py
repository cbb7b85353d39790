"""benchmarks/bench_pretrain.py: how full the UNet chain's caches are at the start of a run."""

import os

import numpy as np
from bench_modules import load_benchmark

bench_pretrain = load_benchmark("bench_pretrain")


def test_cache_fills_names_the_caches_each_config_reads(tmp_path):
    def fills(name):
        return bench_pretrain.cache_fills(name, root=str(tmp_path))

    assert fills("clip_tiny") == {}  # no UNet caches
    # the plain run reads latents only; nothing written yet
    assert fills("unet_tiny") == {"latent": "empty"}
    cache = tmp_path / "output" / "pretrain"
    os.makedirs(cache)
    for name, flags in (("unet_latents", [1, 1, 1, 0]), ("unet_segments", [1] + [0] * 7)):
        with open(cache / f"{name}.npy.done", "wb") as f:  # np.save(path) would add ".npy"
            np.save(f, np.array(flags, np.uint8))
    assert fills("unet_tiny") == {"latent": "75 %"}
    # a grounding run reads the segment cache too
    assert fills("unet_tiny_grounded3") == {"latent": "75 %", "segment": "12 %"}


def test_the_command_sets_compile_only_when_asked_and_the_configs_say_what_they_do():
    def opts(mode):
        cmd = bench_pretrain.pretrain_command("unet_tiny", True, 40, "/tmp/x", mode)
        return dict(zip(cmd[5::2], cmd[6::2]))  # the KEY VALUE pairs after --skip-gates

    assert opts("config")["SOLVER.AMP.ENABLED"] == "True"
    assert "PRETRAIN.COMPILE" not in opts("config")
    assert opts("off")["PRETRAIN.COMPILE"] == "off" and opts("off")["SOLVER.MAX_ITER"] == "40"
    # the UNet chain compiles where it can; CLIP and VAE have nothing to compile
    assert bench_pretrain.pretrain_cfg("unet_tiny_grounded5").PRETRAIN.COMPILE == "auto"
    assert bench_pretrain.pretrain_cfg("clip_tiny").PRETRAIN.COMPILE == "off"


def test_cpu_chain_is_what_make_pretrain_runs():
    """The benchmarks' default configs (bench_pretrain and pretrain_times) are the runs of the CPU
    `make pretrain`, in its order (`make -n` prints its recipe without running it)."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("make") is None:
        pytest.skip("needs GNU make")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        ["make", "-n", "pretrain"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    runs = [part.split(".yaml")[0] for part in out.split("--config-file configs/pretrain/")[1:]]
    assert runs == bench_pretrain.CPU_CHAIN
    assert set(runs) <= set(bench_pretrain.CONFIGS)
