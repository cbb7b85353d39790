"""The three stage-0 tasks (``PRETRAIN.TASK``): what each trains, feeds and exports.

Exports (``PRETRAIN.EXPORT_DIR``):
* ``clip``: an open_clip hub folder (``open_clip_config.json`` + ``open_clip_model.safetensors``),
  what ``MODEL.SPADE.CLIP.PRETRAINED`` names;
* ``vae``: ``<EXPORT_DIR>/vae/`` of a diffusers Stable Diffusion folder;
* ``unet``: ``<EXPORT_DIR>/unet/``, ``scheduler/`` and ``model_index.json`` of the same folder,
  which ``MODEL.SPADE.DIFFUSION.PRETRAINED`` names.
Each exported folder gets a manifest (spade.pretrain.manifest).
"""

from __future__ import annotations

import os

import torch

from .clip import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ClipPretrainModel,
    clip_batches,
    clip_model_config,
    clip_preprocess_config,
    export_open_clip,
)
from .corpus import CORPUS_SEED_OFFSET, Corpus, CorpusSpec, build_corpus
from .engine import register_task
from .manifest import code_commit, write_manifest
from .vae import VaePretrainModel, measure_latent_scale, to_vae_input, vae_batches, vae_config

__all__ = ["corpus_of", "training_info"]


def corpus_of(cfg) -> Corpus:
    """The corpus of PRETRAIN.CORPUS, built first when missing (resumable)."""
    root = str(cfg.PRETRAIN.CORPUS.ROOT)
    build_corpus(root, CorpusSpec.from_cfg(cfg))
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
        "iterations": int(trainer.iter) + 1,
        "batch_size": int(cfg.SOLVER.IMS_PER_BATCH),
        "wall_time_s": round(trainer.wall_clock.seconds, 1),
        "device": str(cfg.MODEL.DEVICE),
        "torch_threads": torch.get_num_threads(),
        "code_commit": code_commit(),
    }


def _export_dir(cfg) -> str:
    out = str(cfg.PRETRAIN.EXPORT_DIR)
    if not out:
        raise ValueError("PRETRAIN.EXPORT_DIR is empty: name the folder the model is exported to")
    return out


@register_task("clip")
class ClipTask:
    def build_model(self, cfg):
        return ClipPretrainModel(clip_model_config(cfg), seed=int(cfg.SEED))

    def batches(self, cfg):
        return clip_batches(
            corpus_of(cfg),
            int(cfg.SOLVER.IMS_PER_BATCH),
            int(cfg.PRETRAIN.CLIP.IMAGE_SIZE),
            float(cfg.PRETRAIN.CLIP.CROP_PROB),
            seed=int(cfg.SEED),
        )

    def export(self, cfg, model, info: dict) -> str:
        folder = _export_dir(cfg)
        export_open_clip(model.clip, clip_model_config(cfg), clip_preprocess_config(cfg), folder)
        write_manifest(folder, [CONFIG_NAME, WEIGHTS_NAME], info)
        return folder


@register_task("vae")
class VaeTask:
    def build_model(self, cfg):
        v = cfg.PRETRAIN.VAE
        return VaePretrainModel(vae_config(cfg), v.KL_WEIGHT, v.L2_WEIGHT, seed=int(cfg.SEED))

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
        probe = to_vae_input(corpus_images(corpus, 64))
        vae.register_to_config(scaling_factor=measure_latent_scale(vae, probe))
        vae.save_pretrained(folder, safe_serialization=True)
        info = dict(info, latent_scale=float(vae.config.scaling_factor))
        write_manifest(folder, ["config.json", "diffusion_pytorch_model.safetensors"], info)
        return folder


def corpus_images(corpus: Corpus, n: int):
    """The first ``n`` corpus images, uint8 [n, S, S, 3] (a seeded probe set)."""
    import numpy as np

    return np.stack([corpus.image(i) for i in range(min(n, len(corpus)))])
