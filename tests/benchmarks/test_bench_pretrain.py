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
