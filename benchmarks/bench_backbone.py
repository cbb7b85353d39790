"""Forward time, peak memory and achieved GFLOP/s of SPADE's diffusion backbone on CPU.

Two presets, batch 1, square images of ``--size`` (default 512):
* ``tiny``: the TINY preset of the default config (what the tests and SynthPSG runs use);
* ``sd15``: Stable-Diffusion-1.5-sized random models (UNet (320, 640, 1280, 1280), 2 layers per
  block, cross_attention_dim 768; VAE (128, 256, 512, 512); open_clip ViT-L-14 for the implicit
  text encoder), built from configs since no weights can be downloaded here.

Per preset: one forward under torch's FlopCounterMode (counts FLOPs, doubles as warm-up), then
``--repeats`` timed forwards (median reported). Peak memory is the process RSS sampled every 5 ms
during a timed forward, minus the RSS before it (activations), beside the RSS of the built model.
The machine's matmul peak is measured with the same thread count (fp32 2048^3 GEMMs, best of
before and after the presets), so "% of peak" says how well the backbone uses the CPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_backbone.py --presets tiny sd15 \
        --out bench_backbone.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Dict

import torch
from detectron2.config import get_cfg
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from sd15_shapes import SD15_UNET, SD15_VAE  # noqa: E402

from spade.config import add_spade_config  # noqa: E402
from spade.modeling.backbone.diffusion_backbone import DiffusionBackbone  # noqa: E402
from spade.modeling.backbone.implicit_text import build_implicit_text_encoder  # noqa: E402
from spade.modeling.backbone.loading import (  # noqa: E402
    DiffusionParts,
    build_clip,
    sd_scheduler,
)
from spade.modeling.backbone.lora import apply_lora  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Context manager sampling the process RSS in a thread; ``.peak`` in bytes."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM throughput of ``repeats`` n^3 products (GFLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def base_cfg():
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def build_tiny() -> DiffusionBackbone:
    cfg = base_cfg()
    torch.manual_seed(0)
    return DiffusionBackbone(cfg)


def build_sd15() -> DiffusionBackbone:
    """SD-1.5-shaped random UNet / VAE and a random ViT-L-14 CLIP, wired as the config does."""
    cfg = base_cfg()
    cfg.MODEL.SPADE.CLIP.MODEL_NAME = "ViT-L-14"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    for module in (unet, vae):
        module.eval().requires_grad_(False)
    diffusion = DiffusionParts(vae, unet, sd_scheduler(), 0.18215)
    clip = build_clip(cfg)
    apply_lora(unet, cfg.MODEL.SPADE.LORA)
    implicit = build_implicit_text_encoder(cfg, clip, 768)
    d = cfg.MODEL.SPADE.DIFFUSION
    return DiffusionBackbone(
        diffusion=diffusion,
        clip=clip,
        implicit_text=implicit,
        feature_blocks=list(d.FEATURE_BLOCKS),
        out_features=list(d.OUT_FEATURES),
        out_channels=int(d.OUT_CHANNELS),
        pixel_mean=list(cfg.MODEL.PIXEL_MEAN),
        pixel_std=list(cfg.MODEL.PIXEL_STD),
        input_format=cfg.INPUT.FORMAT,
    )


BUILDERS = {"tiny": build_tiny, "sd15": build_sd15}


def flops_by_part(counter: FlopCounterMode) -> Dict[str, float]:
    """GFLOP of the VAE encoder, UNet, implicit text encoder (CLIP tower + MLP), projections."""
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = "DiffusionBackbone"
    projections = sum(
        v for k, v in counts.items() if k.startswith(f"{root}.projections.") and k.count(".") == 2
    )
    return {
        "vae_encoder": counts.get(f"{root}.vae.encoder", 0) / 1e9,
        "unet": counts.get(f"{root}.unet", 0) / 1e9,
        "implicit_text": counts.get(f"{root}.implicit_text", 0) / 1e9,
        "projections": projections / 1e9,
    }


def bench(preset: str, size: int, repeats: int) -> Dict[str, float]:
    start = time.perf_counter()
    backbone = BUILDERS[preset]().eval()
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in backbone.parameters())
    clip_params = sum(p.numel() for p in backbone.clip.model.parameters())
    model_rss = _rss_bytes()
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 50
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            backbone(images)
        flops = counter.get_total_flops()
        times, peaks = [], []
        for _ in range(repeats):
            before = _rss_bytes()
            with RssPeak() as rss:
                t0 = time.perf_counter()
                backbone(images)
                times.append(time.perf_counter() - t0)
            peaks.append(rss.peak - before)
    seconds = statistics.median(times)
    return {
        "preset": preset,
        "size": size,
        "build_s": build_s,
        "params_m": params / 1e6,
        "clip_params_m": clip_params / 1e6,
        "model_rss_gib": model_rss / 2**30,
        "forward_s": seconds,
        "activation_peak_gib": max(peaks) / 2**30,
        "gflop": flops / 1e9,
        "gflop_by_part": flops_by_part(counter),
        "gflops_per_s": flops / seconds / 1e9,
    }


def write_json(path: str, payload: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "sd15"], choices=sorted(BUILDERS))
    parser.add_argument("--size", type=int, default=512, help="image side (multiple of 64)")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per preset")
    parser.add_argument("--out", default="output/bench_backbone.json")
    args = parser.parse_args(argv)
    if args.size % 64:
        parser.error(
            f"--size {args.size} must be a multiple of the backbone's size_divisibility 64"
        )
    threads = torch.get_num_threads()
    peak = matmul_peak_gflops()
    rows = [bench(p, args.size, args.repeats) for p in args.presets]
    peak = max(peak, matmul_peak_gflops())  # the machine may be shared: best of before / after
    print(f"CPU, {threads} thread(s), fp32 matmul peak {peak:.1f} GFLOP/s, batch 1, {args.size}^2")
    header = (
        f"{'preset':<7}{'params(M)':>10}{'model RSS':>11}{'forward s':>11}{'act. peak':>11}"
        f"{'GFLOP':>9}{'GFLOP/s':>9}{'% peak':>8}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['preset']:<7}{r['params_m']:>10.1f}{r['model_rss_gib']:>9.2f}Gi"
            f"{r['forward_s']:>11.3f}{r['activation_peak_gib']:>9.2f}Gi{r['gflop']:>9.1f}"
            f"{r['gflops_per_s']:>9.1f}{100 * r['gflops_per_s'] / peak:>7.0f}%"
        )
    print(
        "GFLOP by part: "
        + "; ".join(
            f"{r['preset']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["gflop_by_part"].items())
            for r in rows
        )
    )
    payload = {"threads": threads, "matmul_peak_gflops": peak, "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
