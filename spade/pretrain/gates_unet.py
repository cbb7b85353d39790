"""UNet gates: the paper's premise (cross-attention localises) and generation sanity.

Pointing game. Each synthpsg_val triplet goes through the project's own teacher
(:class:`~spade.calibration.teacher.TeacherMapGenerator`, built from the stage-1 config named by
``PRETRAIN.GATES.CALIBRATION_CONFIG`` with the exported SD folder and CLIP loaded by the standard
loaders): the image is inverted, sampled back with "[subject] is [predicate] [object]", and the role
maps [3, R, R] are read. For the subject (and the object) map:
* *hit*: the centre of the map's argmax cell lies inside a ground-truth segment of that class;
* *mass ratio*: the share of the map's mass on segments of that class divided by their area share
  (1 = no localisation).
Things and stuff are reported apart, for four teachers: the configured one (BELM inversion), DDIM
inversion, random starting noise instead of inversion, and the same UNet with random weights.

Generation sanity: samples for fixed prompts (diffusers' StableDiffusionPipeline fed the CLIP text
tower's token states as ``prompt_embeds``) drawn to ``<sd folder>/samples.png``, and the tiny CLIP's
score of each sample with its own prompt vs with the other prompts.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from spade.data.synthpsg import PREDICATE_CLASSES, THING_CLASSES

from .gates import CLASS_NAMES, GATE_TARGETS, ValImage

__all__ = ["unet_gates", "pointing_game", "SAMPLE_PROMPTS"]

logger = logging.getLogger(__name__)

SAMPLE_PROMPTS = [
    "a large red circle on grass under the sky",
    "a large blue square on ground under the sky",
    "a yellow star and a white ring with the sky above water",
    "a large magenta triangle on wooden floor under the wall",
    "a black cross is left of an orange hexagon",
    "a large white diamond with the sky above grass",
]


def _stage1_cfg(cfg, sd_folder: str):
    from detectron2.config import get_cfg

    from spade.config import add_spade_config

    c = get_cfg()
    add_spade_config(c)
    c.merge_from_file(str(cfg.PRETRAIN.GATES.CALIBRATION_CONFIG))
    c.MODEL.SPADE.PRESET = "PRETRAINED"
    c.MODEL.SPADE.DIFFUSION.PRETRAINED = sd_folder
    c.MODEL.SPADE.CLIP.MODEL_NAME = str(cfg.PRETRAIN.CLIP.NAME)
    c.MODEL.SPADE.CLIP.PRETRAINED = str(cfg.PRETRAIN.UNET.CLIP)
    c.MODEL.DEVICE = "cpu"
    return c


def pointing_game(teacher, images: List[ValImage], image_size: int, max_triplets: int, limit: int):
    """Hit rates and mass ratios of the teacher's subject / object maps (see module doc)."""
    n_things = len(THING_CLASSES)
    stats = {f"{role}_{kind}": [] for role in ("subject", "object") for kind in ("things", "stuff")}
    ratios = {k: [] for k in stats}
    count = 0
    for im in images:
        if count >= limit:
            break
        rels = im.relations[: min(max_triplets, limit - count)]
        if not rels:
            continue
        triplets = [
            (CLASS_NAMES[im.categories[s]], PREDICATE_CLASSES[p], CLASS_NAMES[im.categories[o]])
            for s, o, p in rels
        ]
        image = torch.from_numpy(np.array(im.rgb)).permute(2, 0, 1).float()[None] / 255.0
        image = F.interpolate(image, size=(image_size, image_size), mode="bilinear")[0]
        maps = teacher(image, triplets).float()  # [T, 3, R, R]
        r = maps.shape[-1]
        for t, (s, o, _) in enumerate(rels):
            for role, seg, m in (("subject", s, maps[t, 0]), ("object", o, maps[t, 2])):
                cat = im.categories[seg]
                union = np.any([im.masks[j] for j, c in enumerate(im.categories) if c == cat], 0)
                h = union.shape[0]
                cell = int(m.flatten().argmax())
                cy, cx = divmod(cell, r)
                py = min(h - 1, int((cy + 0.5) * h / r))
                px = min(h - 1, int((cx + 0.5) * h / r))
                kind = "things" if cat < n_things else "stuff"
                stats[f"{role}_{kind}"].append(bool(union[py, px]))
                cover = F.adaptive_avg_pool2d(torch.from_numpy(union).float()[None], r)[0]
                mass = float((m * cover).sum() / m.sum().clamp_min(1e-12))
                ratios[f"{role}_{kind}"].append(mass / max(float(cover.mean()), 1e-6))
        count += len(rels)
    out = {"triplets": count}
    for k in stats:
        out[f"pointing_{k}"] = round(float(np.mean(stats[k])), 4) if stats[k] else None
        out[f"mass_ratio_{k}"] = round(float(np.mean(ratios[k])), 3) if ratios[k] else None
        out[f"count_{k}"] = len(stats[k])
    return out


@torch.no_grad()
def generation_sanity(sd_folder: str, diffusion, clip, seed: int = 0) -> Dict:
    """Sample SAMPLE_PROMPTS (2 seeds each), draw ``samples.png``, CLIP-score own vs shuffled."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from spade.modeling.backbone.loading import clip_preprocess, encode_text_tokens

    pipe = StableDiffusionPipeline(
        vae=diffusion.vae,
        text_encoder=None,
        tokenizer=None,
        unet=diffusion.unet,
        scheduler=diffusion.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    embeds = encode_text_tokens(clip, SAMPLE_PROMPTS)
    negative = encode_text_tokens(clip, [""] * len(SAMPLE_PROMPTS))
    size = int(diffusion.unet.config.sample_size) * 2 ** (
        len(diffusion.vae.config.block_out_channels) - 1
    )
    rows = []
    for s in range(2):
        out = pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            height=size,
            width=size,
            num_inference_steps=25,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(seed + s),
            output_type="np",
        ).images  # [N, H, W, 3] in [0, 1]
        rows.append(out)
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    path = os.path.join(sd_folder, "samples.png")
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)
    images = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2).float()
    img = F.normalize(clip.model.encode_image(clip_preprocess(images, clip)), dim=-1)
    txt = F.normalize(clip.model.encode_text(clip.tokenizer(SAMPLE_PROMPTS)), dim=-1)
    sim = img @ txt.t()  # [2N, N]
    n = len(SAMPLE_PROMPTS)
    own = torch.cat([sim[i * n : (i + 1) * n].diag() for i in range(2)])
    shuffled = (sim.sum(1) - torch.cat([own[:n], own[n:]])) / (n - 1)
    top1 = float(np.mean([int(sim[k].argmax()) == k % n for k in range(2 * n)]))
    return {
        "samples_png": path,
        "clip_score_own": round(float(own.mean()), 4),
        "clip_score_shuffled": round(float(shuffled.mean()), 4),
        "clip_top1_own_prompt": round(top1, 4),
    }


def unet_gates(cfg, sd_folder: str, images: List[ValImage]) -> Dict:
    """Pointing game (4 teachers) and generation sanity of the SD folder ``sd_folder``."""
    from diffusers import UNet2DConditionModel

    from spade.calibration.builder import teacher_generator
    from spade.modeling.backbone.loading import build_clip, build_diffusion_parts

    c = _stage1_cfg(cfg, sd_folder)
    diffusion = build_diffusion_parts(c)
    clip = build_clip(c)
    size = int(c.CALIBRATION.IMAGE_SIZE)
    per_image = int(c.CALIBRATION.MAX_TRIPLETS_PER_IMAGE)
    limit = int(cfg.PRETRAIN.GATES.NUM_TRIPLETS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.SEED))
        random_unet = UNet2DConditionModel.from_config(diffusion.unet.config).eval()
    teachers = {
        "pretrained_belm": teacher_generator(
            c, diffusion, clip, diffusion.unet, inversion="belm", sampler="belm"
        ),
        "pretrained_ddim": teacher_generator(
            c, diffusion, clip, diffusion.unet, inversion="ddim", sampler="ddim"
        ),
        "pretrained_random_noise": teacher_generator(
            c, diffusion, clip, diffusion.unet, noise="random"
        ),
        "random_unet_belm": teacher_generator(
            c, diffusion, clip, random_unet, inversion="belm", sampler="belm"
        ),
    }
    comparison = int(cfg.PRETRAIN.GATES.COMPARISON_TRIPLETS) or limit
    out = {}
    for name, teacher in teachers.items():
        logger.info("pointing game: %s", name)
        n = limit if name == "pretrained_belm" else min(limit, comparison)
        out[name] = pointing_game(teacher, images, size, per_image, n)
    main = out["pretrained_belm"]
    out["unet/pointing_subject_things"] = main["pointing_subject_things"]
    out["unet/mass_ratio_subject_things"] = main["mass_ratio_subject_things"]
    out["generation"] = generation_sanity(sd_folder, diffusion, clip, seed=int(cfg.SEED))
    out["targets"] = {k: v for k, v in GATE_TARGETS.items() if k.startswith("unet/")}
    return out
