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
The comparisons run on the first ``PRETRAIN.GATES.COMPARISON_TRIPLETS`` triplets; the configured
teacher is also summarised on those (``first_<n>``), so the four stand side by side.

Word maps (reported, no target): the UNet's own cross-attention, without the teacher's
inversion and sampling. Each thing of the first ``PRETRAIN.GATES.WORD_MAP_IMAGES`` val images gets
the prompt "a {colour} {shape}", its latent is noised to t = 200 and 500, and the maps of the
colour word and of the shape word are scored against the thing's mask as above. It tells whether
the maps localise words at all, and which words, apart from the pointing game's prompts and
inversion.

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

__all__ = [
    "unet_gates",
    "pointing_game",
    "word_pointing",
    "hit_and_mass_ratio",
    "SAMPLE_PROMPTS",
]

logger = logging.getLogger(__name__)

WORD_TIMESTEPS = (200, 500)  # the word-map probe's noise levels (of 1,000)

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


def hit_and_mass_ratio(m: torch.Tensor, mask: np.ndarray):
    """Score one map against one segment.

    Args:
        m: float [R, R] non-negative map over the image.
        mask: bool [H, W] segment (H, W multiples of R not required).
    Returns:
        (hit, ratio): whether the image pixel at the centre of the map's argmax cell lies in
        ``mask``; the map's mass on ``mask`` (pooled to R x R) over the mask's area share.
    """
    r = m.shape[-1]
    h, w = mask.shape
    cy, cx = divmod(int(m.flatten().argmax()), r)
    py = min(h - 1, int((cy + 0.5) * h / r))
    px = min(w - 1, int((cx + 0.5) * w / r))
    cover = F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None], r)[0]
    mass = float((m * cover).sum() / m.sum().clamp_min(1e-12))
    return bool(mask[py, px]), mass / max(float(cover.mean()), 1e-6)


def _image_tensor(im: ValImage, size: int) -> torch.Tensor:
    """A val image as float [1, 3, size, size] in [0, 1] (bilinear resize)."""
    x = torch.from_numpy(np.array(im.rgb)).permute(2, 0, 1).float()[None] / 255.0
    return F.interpolate(x, size=(size, size), mode="bilinear")


def pointing_game(
    teacher, images: List[ValImage], image_size: int, max_triplets: int, limit: int, first: int = 0
):
    """Hit rates and mass ratios of the teacher's subject / object maps (see module doc).

    Args:
        first: > 0 adds ``first_<first>``, the same summary over the first ``first`` triplets
            only, so a teacher run on fewer triplets (the comparisons) can be set beside this one
            on the same triplets.

    Returns:
        ``triplets``; per role (subject, object) and kind (things, stuff): ``pointing_*`` (hit
        rate), ``mass_ratio_*`` (mean) and ``count_*``; ``pointing_by_class``: role -> class
        name -> [hits, count], which tells a class whose word the maps do not find.
    """
    n_things = len(THING_CLASSES)
    records = []  # (triplet index, role, kind, class name, hit, mass ratio), in triplet order
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
        image = _image_tensor(im, image_size)[0]
        maps = teacher(image, triplets).float()  # [T, 3, R, R]
        for t, (s, o, _) in enumerate(rels):
            for role, seg, m in (("subject", s, maps[t, 0]), ("object", o, maps[t, 2])):
                cat = im.categories[seg]
                union = np.any([im.masks[j] for j, c in enumerate(im.categories) if c == cat], 0)
                hit, ratio = hit_and_mass_ratio(m, union)
                kind = "things" if cat < n_things else "stuff"
                records.append((count + t, role, kind, CLASS_NAMES[cat], hit, ratio))
        count += len(rels)
    out = _pointing_summary(records, count)
    if first > 0:
        n = min(first, count)
        out[f"first_{first}"] = _pointing_summary([r for r in records if r[0] < n], n)
    return out


def _pointing_summary(records, count: int) -> Dict:
    """:func:`pointing_game`'s summary of per-map records."""
    out = {"triplets": count}
    by_class = {role: {} for role in ("subject", "object")}  # role -> class -> [hits, count]
    for role in ("subject", "object"):
        for kind in ("things", "stuff"):
            rows = [r for r in records if r[1] == role and r[2] == kind]
            k = f"{role}_{kind}"
            out[f"pointing_{k}"] = round(float(np.mean([r[4] for r in rows])), 4) if rows else None
            out[f"mass_ratio_{k}"] = (
                round(float(np.mean([r[5] for r in rows])), 3) if rows else None
            )
            out[f"count_{k}"] = len(rows)
    for _, role, _, name, hit, _ in records:
        tally = by_class[role].setdefault(name, [0, 0])
        tally[0] += int(hit)
        tally[1] += 1
    out["pointing_by_class"] = {role: dict(sorted(c.items())) for role, c in by_class.items()}
    return out


def _word_span(encode_ids, head: str, word: str) -> List[int]:
    """Context positions of ``word`` appended to ``head`` (position 0 is the start token)."""
    start = len(encode_ids(head)) if head else 0
    stop = len(encode_ids(f"{head} {word}".strip()))
    return list(range(1 + start, 1 + stop))


@torch.no_grad()
def word_pointing(
    diffusion,
    clip,
    unet,
    images: List[ValImage],
    timesteps=WORD_TIMESTEPS,
    seed: int = 0,
    resolution: int = 16,
    image_size: int = 128,
) -> Dict:
    """The UNet's own word maps, without inversion or sampling (see module doc).

    Each thing of each image gets the prompt "a {colour} {shape}"; the image's latent is noised
    to each timestep of ``timesteps`` (seeded noise, SD's training schedule) and one UNet pass
    gives the cross-attention maps of the colour word and of the shape word, scored against the
    thing's own mask by :func:`hit_and_mass_ratio`.

    Returns:
        {"things": N, "t<T>": {"colour_hit", "colour_mass_ratio", "shape_hit",
        "shape_mass_ratio"}} (means over the N things).
    """
    from spade.calibration.attention import AttentionStore, capture_cross_attention
    from spade.modeling.backbone.loading import encode_text_tokens

    from .unet import training_scheduler

    scheduler = training_scheduler()
    g = torch.Generator().manual_seed(int(seed))
    p = next(unet.parameters())
    scores = {int(t): {k: [] for k in ("colour", "shape")} for t in timesteps}
    masses = {int(t): {k: [] for k in ("colour", "shape")} for t in timesteps}
    n = 0
    for im in images:
        x = _image_tensor(im, image_size)
        latent = diffusion.vae.encode((x * 2 - 1).to(p)).latent_dist.mean * diffusion.latent_scale
        for k, colour in enumerate(im.colours):
            shape = THING_CLASSES[im.categories[k]]
            spans = {
                "colour": _word_span(clip.tokenizer.encode, "a", colour),
                "shape": _word_span(clip.tokenizer.encode, f"a {colour}", shape),
            }
            context = encode_text_tokens(clip, [f"a {colour} {shape}"]).to(p)
            for t in scores:
                noise = torch.randn(latent.shape, generator=g).to(p)
                step = torch.tensor([t])
                noisy = scheduler.add_noise(latent, noise, step.to(p.device))
                store = AttentionStore(resolution, latent.shape[-2:])
                with capture_cross_attention(unet, store):
                    unet(noisy, step.to(p.device), encoder_hidden_states=context)
                maps = store.mean()[0].float().cpu()  # [L, R, R]
                for word, span in spans.items():
                    hit, ratio = hit_and_mass_ratio(maps[span].mean(0), im.masks[k])
                    scores[t][word].append(hit)
                    masses[t][word].append(ratio)
            n += 1
    out = {"things": n}
    for t in scores:
        out[f"t{t}"] = {
            f"{w}_{name}": round(float(np.mean(v[t][w])), 4) if n else None
            for w in ("colour", "shape")
            for name, v in (("hit", scores), ("mass_ratio", masses))
        }
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

    word_images = int(cfg.PRETRAIN.GATES.WORD_MAP_IMAGES)
    if word_images < 0:
        raise ValueError(
            f"PRETRAIN.GATES.WORD_MAP_IMAGES must be >= 0 (0 = all val images), got {word_images}"
        )
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
        configured = name == "pretrained_belm"  # also scored on the comparisons' triplets
        n = limit if configured else min(limit, comparison)
        first = comparison if configured else 0
        out[name] = pointing_game(teacher, images, size, per_image, n, first=first)
    logger.info("word maps: pretrained and random UNet")
    images_for_words = images[:word_images] if word_images else images
    out["word_maps"] = {
        "pretrained": word_pointing(
            diffusion, clip, diffusion.unet, images_for_words, seed=int(cfg.SEED), image_size=size
        ),
        "random_unet": word_pointing(
            diffusion, clip, random_unet, images_for_words, seed=int(cfg.SEED), image_size=size
        ),
    }
    main = out["pretrained_belm"]
    out["unet/pointing_subject_things"] = main["pointing_subject_things"]
    out["unet/mass_ratio_subject_things"] = main["mass_ratio_subject_things"]
    out["generation"] = generation_sanity(sd_folder, diffusion, clip, seed=int(cfg.SEED))
    out["targets"] = {k: v for k, v in GATE_TARGETS.items() if k.startswith("unet/")}
    return out
