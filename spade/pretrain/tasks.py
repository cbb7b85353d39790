"""The three stage-0 tasks (``PRETRAIN.TASK``): what each trains, feeds and exports.

Exports (``PRETRAIN.EXPORT_DIR``):
* ``clip``: an open_clip hub folder (``open_clip_config.json`` + ``open_clip_model.safetensors``),
  what ``MODEL.SPADE.CLIP.PRETRAINED`` names;
* ``vae``: ``<EXPORT_DIR>/vae/`` of a diffusers Stable Diffusion folder;
* ``unet``: ``<EXPORT_DIR>/unet/``, ``scheduler/`` and ``model_index.json`` of the same folder,
  which ``MODEL.SPADE.DIFFUSION.PRETRAINED`` names.
Each exported folder gets a manifest (spade.utils.manifest).
"""

from __future__ import annotations

import functools
import logging
import os
import time

import numpy as np
import torch
import yaml
from detectron2.utils import comm

from spade.utils.manifest import verify_model_folder, write_manifest

from .clip import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ClipPretrainModel,
    clip_batches,
    clip_model_config,
    clip_preprocess_config,
    export_open_clip,
)
from .corpus import (
    CORPUS_SEED_OFFSET,
    Corpus,
    CorpusSpec,
    build_corpus_parallel,
    check_disjoint,
)
from .engine import register_task, worker_batches
from .vae import VaePretrainModel, measure_latent_scale, to_vae_input, vae_batches, vae_config

__all__ = ["corpus_of", "training_info", "chain_training_runs"]


def corpus_of(cfg) -> Corpus:
    """The corpus of PRETRAIN.CORPUS, built first when missing (resumable)."""
    root = str(cfg.PRETRAIN.CORPUS.ROOT)
    check_disjoint(int(cfg.PRETRAIN.CORPUS.SEED), [int(cfg.PRETRAIN.GATES.DATA_SEED)])
    build_corpus_parallel(root, CorpusSpec.from_cfg(cfg), int(cfg.PRETRAIN.NUM_WORKERS))
    return Corpus(root, synonym_prob=float(cfg.PRETRAIN.CORPUS.SYNONYM_PROB))


def training_info(cfg, trainer) -> dict:
    """The manifest's record of how a model was trained."""
    c = cfg.PRETRAIN.CORPUS
    first = CORPUS_SEED_OFFSET + int(c.SEED)
    return {
        "task": str(cfg.PRETRAIN.TASK),
        "config": cfg.dump(),
        "seed": int(cfg.SEED),
        "corpus": {
            "generator_seed": first,
            "images": [0, int(c.NUM_IMAGES)],
            "held_out_images": [int(c.NUM_IMAGES), int(c.NUM_IMAGES) + int(c.HELD_OUT)],
            "rule": "render_scene(generator_seed, i, num_things=PRETRAIN.CORPUS.NUM_THINGS); "
            "SynthPSG datasets use generator seeds < 1,000,000",
        },
        "iterations": int(trainer.iter),  # detectron2 leaves iter at max_iter after training
        "batch_size": int(cfg.SOLVER.IMS_PER_BATCH),
        "wall_time_s": round(trainer.wall_clock.seconds, 1),
        "device": str(cfg.MODEL.DEVICE),
        "torch_threads": torch.get_num_threads(),
        "precision": _precision(cfg),
        "code_commit": trainer.code_commit,
    }


def _run_record(info: dict) -> dict:
    """One run of a chain, as ``training_runs`` lists it: where it wrote, what it started from,
    how long and on what it trained."""
    cfg = _config_of(info)
    record = {
        "output_dir": str(cfg.get("OUTPUT_DIR", "")),
        "weights_from": str(cfg.get("MODEL", {}).get("WEIGHTS", "")),
    }
    for key in ("iterations", "batch_size", "wall_time_s", "device", "precision", "code_commit"):
        if key in info:
            record[key] = info[key]
    return record


def _config_of(info: dict) -> dict:
    text = info.get("config")
    if not isinstance(text, str):
        return {}
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def chain_training_runs(info: dict, previous, weights: str) -> dict:
    """``info`` with the whole chain of runs that made the model, when this run continued the one
    whose export it replaces.

    ``previous`` is the manifest in the export folder before this run exports over it (None if
    there is none). The run continued it when ``weights`` (``MODEL.WEIGHTS``) lies in the
    ``OUTPUT_DIR`` that manifest's config names: then ``training_runs`` lists the earlier runs
    (the previous manifest's own list, or the previous run itself) and this one, and
    ``samples_seen`` and ``chain_wall_time_s`` sum them. Otherwise ``info`` is returned as it is:
    a run from scratch, or from weights of another origin, is a chain of one.
    """
    if not previous or not weights:
        return info
    before = str(_config_of(previous).get("OUTPUT_DIR", ""))
    started = os.path.abspath(os.path.dirname(weights))
    if not before or started != os.path.abspath(before):
        return info
    runs = list(previous.get("training_runs") or [_run_record(previous)])
    runs.append(_run_record(info))
    info = dict(info, training_runs=runs)
    samples = (int(r.get("iterations", 0)) * int(r.get("batch_size", 0)) for r in runs)
    info["samples_seen"] = sum(samples)
    info["chain_wall_time_s"] = round(sum(float(r.get("wall_time_s", 0.0)) for r in runs), 1)
    return info


def _precision(cfg) -> str:
    """How the forward ran: fp32, or mixed precision (SOLVER.AMP.ENABLED: fp16 autocast with a
    grad scaler on CUDA, detectron2's AMPTrainer; bf16 autocast on the CPU)."""
    if not cfg.SOLVER.AMP.ENABLED:
        return "fp32"
    return "fp16 autocast" if str(cfg.MODEL.DEVICE).startswith("cuda") else "bf16 autocast"


def region_grid(cfg) -> int:
    """Side of the tiny CLIP's dense grid when the region loss is on, else 0."""
    c = cfg.PRETRAIN.CLIP
    return int(c.IMAGE_SIZE) // int(c.PATCH_SIZE) if float(c.REGION_WEIGHT) > 0 else 0


def _grounded(cfg) -> bool:
    """Whether the UNet trains with a grounding loss (so its batches need grounding targets)."""
    u = cfg.PRETRAIN.UNET
    return float(u.GROUNDING_WEIGHT) > 0 or float(u.GROUNDING_PIXEL_WEIGHT) > 0


def _export_dir(cfg) -> str:
    out = str(cfg.PRETRAIN.EXPORT_DIR)
    if not out:
        raise ValueError("PRETRAIN.EXPORT_DIR is empty: name the folder the model is exported to")
    return out


@register_task("clip")
class ClipTask:
    def build_model(self, cfg):
        return ClipPretrainModel(
            clip_model_config(cfg),
            seed=int(cfg.SEED),
            region_weight=float(cfg.PRETRAIN.CLIP.REGION_WEIGHT),
            train_text=bool(cfg.PRETRAIN.CLIP.TRAIN_TEXT),
        )

    def batches(self, cfg):
        make = functools.partial(
            clip_batches,
            corpus_of(cfg),
            int(cfg.SOLVER.IMS_PER_BATCH),
            int(cfg.PRETRAIN.CLIP.IMAGE_SIZE),
            float(cfg.PRETRAIN.CLIP.CROP_PROB),
            seed=int(cfg.SEED),
            negatives=int(cfg.PRETRAIN.CLIP.HARD_NEGATIVES),
            region_grid=region_grid(cfg),
        )
        return worker_batches(make, int(cfg.PRETRAIN.NUM_WORKERS))

    def export(self, cfg, model, info: dict) -> str:
        folder = _export_dir(cfg)
        export_open_clip(model.clip, clip_model_config(cfg), clip_preprocess_config(cfg), folder)
        info = dict(info, model_name=str(cfg.PRETRAIN.CLIP.NAME))
        write_manifest(folder, [CONFIG_NAME, WEIGHTS_NAME], info)
        return folder


@register_task("vae")
class VaeTask:
    def build_model(self, cfg):
        v = cfg.PRETRAIN.VAE
        return VaePretrainModel(
            vae_config(cfg),
            v.KL_WEIGHT,
            v.L2_WEIGHT,
            seed=int(cfg.SEED),
            train_encoder=bool(v.TRAIN_ENCODER),
        )

    def batches(self, cfg):
        return vae_batches(
            corpus_of(cfg),
            int(cfg.SOLVER.IMS_PER_BATCH),
            int(cfg.PRETRAIN.VAE.CROP_SIZE),
            seed=int(cfg.SEED),
        )

    def export(self, cfg, model, info: dict) -> str:
        folder = os.path.join(_export_dir(cfg), "vae")
        vae = model.vae.eval()
        corpus = corpus_of(cfg)
        probe = to_vae_input(np.stack([corpus.image(i) for i in range(min(64, len(corpus)))]))
        vae.register_to_config(scaling_factor=measure_latent_scale(vae, probe))
        vae.save_pretrained(folder, safe_serialization=True)
        info = dict(info, latent_scale=float(vae.config.scaling_factor))
        write_manifest(folder, ["config.json", "diffusion_pytorch_model.safetensors"], info)
        return folder


@register_task("unet")
class UnetTask:
    """Trains the UNet on frozen PRETRAIN.UNET.CLIP (text) and PRETRAIN.UNET.VAE latents."""

    def _frozen(self, cfg):
        from diffusers import AutoencoderKL

        from spade.modeling.backbone.loading import load_clip_folder

        u = cfg.PRETRAIN.UNET
        if not u.CLIP or not u.VAE:
            raise ValueError(
                "PRETRAIN.UNET.CLIP and PRETRAIN.UNET.VAE must name the pretrained models"
            )
        clip = load_clip_folder(str(u.CLIP))
        vae_dir = os.path.join(str(u.VAE), "vae")
        verify_model_folder(vae_dir, "PRETRAIN.UNET.VAE")
        vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
        return clip, vae

    def build_model(self, cfg):
        from diffusers import UNet2DConditionModel

        from .unet import UnetPretrainModel, unet_config

        clip, vae = self._frozen(cfg)
        size = int(cfg.PRETRAIN.CORPUS.IMAGE_SIZE) // 2 ** (len(vae.config.block_out_channels) - 1)
        config = unet_config(cfg, clip.text_width, vae.config.latent_channels, size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.SEED))
            unet = UNet2DConditionModel(**config)
        weights = {}
        for key in ("GROUNDING_WEIGHT", "GROUNDING_PIXEL_WEIGHT"):
            weights[key] = float(cfg.PRETRAIN.UNET.get(key))
            if weights[key] < 0:
                raise ValueError(f"PRETRAIN.UNET.{key} must be >= 0, got {weights[key]}")
        return UnetPretrainModel(
            unet,
            clip,
            seed=int(cfg.SEED),
            grounding_weight=weights["GROUNDING_WEIGHT"],
            pixel_weight=weights["GROUNDING_PIXEL_WEIGHT"],
        )

    def batches(self, cfg):
        from .unet import LatentCache, SegmentCache, unet_batches

        clip, vae = self._frozen(cfg)
        vae.to(torch.device(cfg.MODEL.DEVICE))  # latents are cached on first use, on the device
        corpus = corpus_of(cfg)
        path = str(cfg.PRETRAIN.UNET.LATENT_CACHE) or os.path.join(cfg.OUTPUT_DIR, "latents.npy")
        cache = _main_process_first(
            lambda: LatentCache(path, vae, vae.config.scaling_factor, corpus)
        )
        if cfg.PRETRAIN.UNET.FILL_LATENT_CACHE:
            n = int(cfg.PRETRAIN.UNET.NUM_IMAGES) or len(corpus)
            start = time.perf_counter()
            done = cache.fill(corpus, range(comm.get_rank(), n, comm.get_world_size()))
            comm.synchronize()
            if done:
                logging.getLogger(__name__).info(
                    f"Latent cache {path}: encoded {done} corpus images in "
                    f"{(time.perf_counter() - start) / 60:.1f} min before training"
                )
        segments = None
        if _grounded(cfg):
            seg_path = str(cfg.PRETRAIN.UNET.SEGMENT_CACHE) or os.path.join(
                cfg.OUTPUT_DIR, "segments.npy"
            )
            segments = _main_process_first(lambda: SegmentCache(seg_path, corpus))
        return unet_batches(
            corpus,
            cache,
            int(cfg.SOLVER.IMS_PER_BATCH),
            float(cfg.PRETRAIN.UNET.CAPTION_DROPOUT),
            seed=int(cfg.SEED),
            num_images=int(cfg.PRETRAIN.UNET.NUM_IMAGES),
            encode=clip.tokenizer.encode if _grounded(cfg) else None,
            teacher_form_share=float(cfg.PRETRAIN.UNET.TEACHER_FORM_SHARE),
            pixel_phrase=bool(cfg.PRETRAIN.UNET.GROUNDING_PIXEL_PHRASE),
            segment_cache=segments,
        )

    def export(self, cfg, model, info: dict) -> str:
        from spade.modeling.backbone.loading import sd_scheduler

        root = _export_dir(cfg)
        folder = os.path.join(root, "unet")
        _copy_vae_if_missing(str(cfg.PRETRAIN.UNET.VAE), root)
        unet = model.unet.eval()
        unet.to(torch.float16).save_pretrained(folder, safe_serialization=True)
        unet.to(torch.float32)
        sd_scheduler().save_pretrained(os.path.join(root, "scheduler"))
        write_model_index(root)
        write_manifest(folder, ["config.json", "diffusion_pytorch_model.safetensors"], info)
        return folder


def _main_process_first(make):
    """``make()`` on the main process, then on the others: the first to open a cache creates its
    files, so no process truncates files another has already mapped."""
    made = make() if comm.is_main_process() else None
    comm.synchronize()
    return made if made is not None else make()


def _copy_vae_if_missing(vae_root: str, root: str) -> None:
    """Make ``root`` a complete SD folder: a UNet exported beside a VAE other than its own folder's
    (``PRETRAIN.EXPORT_DIR`` != ``PRETRAIN.UNET.VAE``, e.g. an experiment) gets a copy of the VAE
    it was trained on; an existing ``root/vae`` is never replaced."""
    import shutil

    src, dst = os.path.join(vae_root, "vae"), os.path.join(root, "vae")
    if os.path.exists(dst) or os.path.abspath(src) == os.path.abspath(dst):
        return
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)


def write_model_index(root: str) -> None:
    """diffusers' model_index.json of the SD folder (text conditioning comes from the open_clip
    folder named by MODEL.SPADE.CLIP.PRETRAINED, so text_encoder / tokenizer are null)."""
    import diffusers

    from spade.utils.io import atomic_write_json

    atomic_write_json(
        os.path.join(root, "model_index.json"),
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "vae": ["diffusers", "AutoencoderKL"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": [None, None],
            "tokenizer": [None, None],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
        indent=2,
    )
