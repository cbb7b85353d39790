#!/usr/bin/env python
"""Teacher-map throughput (images/s) of stage 1 on random-weight models.

Runs the real :class:`spade.calibration.teacher.TeacherMapGenerator` path (VAE encode, BELM
inversion, O-BELM sampling with attn2 capture, role maps) on

* ``tiny``: the project's TINY preset (MODEL.SPADE.DIFFUSION.TINY + the TINY CLIP text tower);
* ``sd``:   a UNet / VAE with Stable Diffusion 1.5's architecture (860 M UNet parameters) and
  random weights; the text states are random [T, 77, 768] tensors (the text encoder runs once per
  image and is a negligible share of the cost).

Cost model: 2 * steps UNet passes of batch T (triplets) per image, plus one VAE encode.
Prints a table and writes JSON (``--out``). Example::

    OMP_NUM_THREADS=2 python benchmarks/bench_teacher.py --models tiny sd --out bench_teacher.json
"""

import argparse
import functools
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spade.calibration.teacher import TeacherMapGenerator  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sd15_shapes import SD15_UNET, SD15_VAE  # noqa: E402


def tiny_generator(steps: int, resolution: int) -> TeacherMapGenerator:
    from detectron2.config import get_cfg

    from spade.config import add_spade_config
    from spade.modeling.backbone import build_clip, build_diffusion_parts, encode_text_tokens

    cfg = get_cfg()
    add_spade_config(cfg)
    parts, clip = build_diffusion_parts(cfg), build_clip(cfg)
    return TeacherMapGenerator(
        unet=parts.unet,
        vae=parts.vae,
        latent_scale=parts.latent_scale,
        scheduler=parts.scheduler,
        encode_text=functools.partial(encode_text_tokens, clip),
        encode_ids=clip.tokenizer.encode,
        context_length=77,
        num_steps=steps,
        resolution=resolution,
    )


def sd_generator(steps: int, resolution: int) -> TeacherMapGenerator:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from open_clip.tokenizer import SimpleTokenizer

    from spade.modeling.backbone.loading import sd_scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)
    vae = AutoencoderKL(**SD15_VAE).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)

    def encode_text(prompts):
        return torch.randn(len(prompts), 77, 768, generator=g)

    return TeacherMapGenerator(
        unet=unet,
        vae=vae,
        latent_scale=0.18215,
        scheduler=sd_scheduler(),
        encode_text=encode_text,
        encode_ids=SimpleTokenizer().encode,
        context_length=77,
        num_steps=steps,
        resolution=resolution,
    )


def measure(name, gen, image_size, triplets, repeats):
    names = [("circle", "left of", "red square"), ("star", "above", "traffic light")]
    trip = [names[i % 2] for i in range(triplets)]
    image = torch.rand(3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    gen(image, trip[:1])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        maps = gen(image, trip)
    sec = (time.perf_counter() - start) / repeats
    assert maps.shape[0] == triplets and torch.isfinite(maps).all()
    return {
        "model": name,
        "image_size": image_size,
        "steps": gen.grid.num_steps,
        "triplets": triplets,
        "seconds_per_image": sec,
        "images_per_s": 1.0 / sec,
        "unet_passes_per_image": 2 * gen.grid.num_steps,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "sd"], choices=["tiny", "sd"])
    p.add_argument("--tiny-image-size", type=int, default=128)
    p.add_argument("--tiny-steps", type=int, default=10)
    p.add_argument("--tiny-triplets", type=int, default=8)
    p.add_argument("--sd-image-size", type=int, default=256)
    p.add_argument("--sd-steps", type=int, default=2)
    p.add_argument("--sd-triplets", type=int, default=1)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    rows = []
    for name in a.models:
        if name == "tiny":
            gen = tiny_generator(a.tiny_steps, a.resolution)
            rows.append(measure(name, gen, a.tiny_image_size, a.tiny_triplets, a.repeats))
        else:
            gen = sd_generator(a.sd_steps, a.resolution)
            rows.append(measure(name, gen, a.sd_image_size, a.sd_triplets, max(1, a.repeats // 2)))
    print(f"{'model':6} {'size':>5} {'steps':>5} {'T':>3} {'s/image':>9} {'images/s':>9}")
    for r in rows:
        print(
            f"{r['model']:6} {r['image_size']:5d} {r['steps']:5d} {r['triplets']:3d} "
            f"{r['seconds_per_image']:9.3f} {r['images_per_s']:9.4f}"
        )
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "rows": rows,
    }
    if a.out:
        from spade.utils.io import atomic_write_json

        atomic_write_json(a.out, info, indent=2)
    return info


if __name__ == "__main__":
    main()
