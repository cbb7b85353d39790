"""Whole-model inference latency and peak memory per image (panoptic + scene graph), on CPU.

Two configurations, batch 1, random weights built from configs (no weights can be downloaded here):
* ``tiny``: configs/synthetic/spade_tiny_synthpsg.yaml at 128x128 (what `make demo` trains);
* ``sd15``: the same head on a Stable-Diffusion-1.5-sized UNet / VAE (UNet (320, 640, 1280, 1280),
  2 layers per block, cross-attention 768; VAE (128, 256, 512, 512)) and an open_clip ViT-L-14,
  at 512x512.

Per configuration: one warm-up image, then ``--repeats`` timed images (median reported). Peak memory
is the process RSS sampled during a timed image minus the RSS before it (activations), beside the
RSS of the built model.

    OMP_NUM_THREADS=2 python benchmarks/bench_inference.py --presets tiny sd15 --out results.json
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_backbone import RssPeak, _rss_bytes  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import spade.modeling  # noqa: E402,F401  (registers SPADE)
from spade.config import add_spade_config  # noqa: E402
from spade.data.synthpsg import PREDICATE_CLASSES, STUFF_CLASSES, THING_CLASSES  # noqa: E402

TINY_CONFIG = os.path.join(HERE, "..", "configs", "synthetic", "spade_tiny_synthpsg.yaml")
SD15_OPTS = [
    "MODEL.SPADE.DIFFUSION.TINY.BLOCK_OUT_CHANNELS",
    [320, 640, 1280, 1280],
    "MODEL.SPADE.DIFFUSION.TINY.LAYERS_PER_BLOCK",
    2,
    "MODEL.SPADE.DIFFUSION.TINY.ATTENTION_HEAD_DIM",
    8,
    "MODEL.SPADE.DIFFUSION.TINY.CROSS_ATTENTION_DIM",
    768,
    "MODEL.SPADE.DIFFUSION.TINY.VAE_BLOCK_OUT_CHANNELS",
    [128, 256, 512, 512],
    "MODEL.SPADE.CLIP.MODEL_NAME",
    "ViT-L-14",
    "MODEL.SPADE.CLIP.PRETRAINED",
    "",
    # random weights of SD 1.5's shapes through the TINY path (the tiny config loads shipped ones)
    "MODEL.SPADE.PRESET",
    "TINY",
    "MODEL.SPADE.DIFFUSION.PRETRAINED",
    "",
]
PRESETS = {"tiny": (128, []), "sd15": (512, SD15_OPTS)}


def build(preset: str):
    size, opts = PRESETS[preset]
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.merge_from_file(TINY_CONFIG)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.IMAGE_SIZE = size
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if hasattr(model, "set_vocabulary"):
        model.set_vocabulary(THING_CLASSES + STUFF_CLASSES, PREDICATE_CLASSES)
    return model, size


def bench(preset: str, repeats: int) -> dict:
    rss0 = _rss_bytes()
    model, size = build(preset)
    model_rss = _rss_bytes() - rss0
    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.integers(0, 256, (3, size, size), dtype=np.uint8))
    batch = [{"image": image, "height": size, "width": size}]
    times, peaks = [], []
    with torch.no_grad():
        model(batch)  # warm-up
        for _ in range(repeats):
            before = _rss_bytes()
            with RssPeak() as peak:
                t0 = time.perf_counter()
                out = model(batch)[0]
                times.append(time.perf_counter() - t0)
            peaks.append(peak.peak - before)
    n_rel = int(out["relations"]["triplets"].shape[0]) if "relations" in out else 0
    return {
        "preset": preset,
        "image": f"{size}x{size}",
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "model_rss_GiB": round(model_rss / 2**30, 2),
        "latency_s": round(statistics.median(times), 3),
        "activation_peak_GiB": round(max(peaks) / 2**30, 3),
        "triplets_out": n_rel,
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "sd15"], choices=sorted(PRESETS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    rows = [bench(preset, args.repeats) for preset in args.presets]
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))
    payload = {"rows": rows}
    if args.out:
        from spade.utils.io import atomic_write_json

        atomic_write_json(args.out, payload, indent=2)
    return payload


if __name__ == "__main__":
    main()
