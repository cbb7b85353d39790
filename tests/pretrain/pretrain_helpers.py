"""A miniature of the miniature world: stage-0 configs small enough to train in seconds."""

import argparse

from spade.pretrain import setup_pretrain_cfg

TINY_OPTS = [
    "PRETRAIN.CORPUS.NUM_IMAGES", "24",
    "PRETRAIN.CORPUS.SHARD_SIZE", "12",
    "PRETRAIN.CORPUS.IMAGE_SIZE", "64",
    "PRETRAIN.CLIP.EMBED_DIM", "16",
    "PRETRAIN.CLIP.IMAGE_SIZE", "32",
    "PRETRAIN.CLIP.VISION_WIDTH", "32",
    "PRETRAIN.CLIP.VISION_LAYERS", "1",
    "PRETRAIN.CLIP.TEXT_WIDTH", "32",
    "PRETRAIN.CLIP.TEXT_LAYERS", "1",
    "PRETRAIN.CLIP.HEAD_WIDTH", "16",
    "PRETRAIN.VAE.BLOCK_OUT_CHANNELS", "[8, 16]",
    "PRETRAIN.VAE.CROP_SIZE", "32",
    "PRETRAIN.UNET.BLOCK_OUT_CHANNELS", "[16, 32]",
    "PRETRAIN.UNET.CROSS_ATTENTION_LEVELS", "[True, False]",
    "PRETRAIN.UNET.ONLY_CROSS_ATTENTION_LEVELS", "[True, False]",
    "PRETRAIN.UNET.ATTENTION_HEAD_DIM", "8",
    "PRETRAIN.UNET.HEAD_CHANNELS", "8",
    "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "1",
    "PRETRAIN.COMPILE", "off",  # compiling costs a minute; test_compile.py tests it
]  # fmt: skip


def make_args(config_file, opts, resume=False, eval_only=False):
    return argparse.Namespace(
        config_file=config_file,
        opts=list(opts),
        resume=resume,
        eval_only=eval_only,
        skip_gates=True,
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
    )


def tiny_cfg(config_file, root, task, max_iter=2, resume=False, extra=()):
    opts = TINY_OPTS + [
        "PRETRAIN.CORPUS.ROOT", str(root / "corpus"),
        "PRETRAIN.UNET.CLIP", str(root / "clip"),
        "PRETRAIN.UNET.VAE", str(root / "sd"),
        "PRETRAIN.EXPORT_DIR", str(root / ("clip" if task == "clip" else "sd")),
        "OUTPUT_DIR", str(root / f"out_{task}"),
        "PRETRAIN.UNET.LATENT_CACHE", "",  # each run its own (OUTPUT_DIR/latents.npy)
        "PRETRAIN.UNET.SEGMENT_CACHE", "",  # each run its own (OUTPUT_DIR/segments.npy)
        "SOLVER.MAX_ITER", str(max_iter),
    ] + list(extra)  # fmt: skip
    args = make_args(config_file, opts, resume=resume)
    return setup_pretrain_cfg(args, do_default_setup=False), args


class ZeroLatents:
    """A latent cache stand-in: unet_batches only asks it for latents of given images."""

    def get(self, corpus, indices):
        import torch

        return torch.zeros(len(indices), 4, 2, 2)
