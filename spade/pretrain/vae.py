"""Tiny VAE: a diffusers ``AutoencoderKL`` trained on corpus images (reconstruction + KL, as SD's).

Loss: L1 + ``L2_WEIGHT`` * squared error on [-1, 1] pixels of random ``CROP_SIZE`` crops (the VAE
is fully convolutional; crops keep an iteration cheap), plus ``KL_WEIGHT`` * the KL divergence of
the posterior to N(0, I), SD's weighting. After training the latent scaling factor that gives
unit-variance latents is measured on corpus images, as SD's 0.18215 was, and stored in the
exported ``vae/config.json`` (``scaling_factor``).
"""

from __future__ import annotations

from typing import Dict, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.utils import comm
from diffusers import AutoencoderKL
from torch import nn

from spade.modeling.backbone.loading import autoencoder_kl_config

from .corpus import Corpus

__all__ = [
    "vae_config",
    "VaePretrainModel",
    "encoder_parameters",
    "vae_batches",
    "measure_latent_scale",
    "psnr",
]


def vae_config(cfg) -> dict:
    """AutoencoderKL kwargs from PRETRAIN.VAE (downsampling factor 2^(levels - 1))."""
    v = cfg.PRETRAIN.VAE
    return autoencoder_kl_config(
        v.BLOCK_OUT_CHANNELS,
        v.LAYERS_PER_BLOCK,
        v.LATENT_CHANNELS,
        sample_size=int(cfg.PRETRAIN.CORPUS.IMAGE_SIZE),
        scaling_factor=1.0,  # measured after training (measure_latent_scale)
    )


class VaePretrainModel(nn.Module):
    """AutoencoderKL + SD's loss; ``forward(batch)`` returns the loss dict.

    batch: ``{"images": float [B, 3, s, s] in [-1, 1]}``.
    """

    def __init__(
        self,
        config: dict,
        kl_weight: float,
        l2_weight: float,
        seed: int = 0,
        train_encoder: bool = True,
    ):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vae = AutoencoderKL(**config)
        self.kl_weight = float(kl_weight)
        self.l2_weight = float(l2_weight)
        self.train_encoder = bool(train_encoder)
        if not self.train_encoder:
            for p in encoder_parameters(self.vae):
                p.requires_grad_(False)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        x = batch["images"].to(self.vae.device)
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        losses = {
            "loss_l1": F.l1_loss(recon, x),
            "loss_l2": self.l2_weight * F.mse_loss(recon, x),
        }
        if self.train_encoder:  # a frozen encoder's posterior has no gradient to take
            losses["loss_kl"] = self.kl_weight * posterior.kl().mean()
        return losses


def encoder_parameters(vae: AutoencoderKL):
    """Encoder + quant_conv: what makes the latents. A decoder-only fine-tune (as SD's own VAE
    decoder was fine-tuned after release) keeps them, so a UNet trained on them stays valid."""
    return list(vae.encoder.parameters()) + list(vae.quant_conv.parameters())


def to_vae_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def vae_batches(
    corpus: Corpus, batch_size: int, crop_size: int, seed: int
) -> Iterator[Dict[str, torch.Tensor]]:
    """Endless seeded batches of random ``crop_size`` crops of corpus images."""
    stream = corpus.iter_indices(seed, comm.get_rank(), comm.get_world_size())
    size = corpus.spec.image_size
    if not 8 <= crop_size <= size:
        raise ValueError(f"PRETRAIN.VAE.CROP_SIZE={crop_size} must be in [8, {size}]")
    step = 0
    while True:
        rng = np.random.default_rng([seed, step, 11])
        crops = []
        for _ in range(batch_size):
            i, _ = next(stream)
            top, left = rng.integers(0, size - crop_size + 1, size=2)
            crops.append(corpus.image(i)[top : top + crop_size, left : left + crop_size])
        yield {"images": to_vae_input(np.stack(crops))}
        step += 1


@torch.no_grad()
def measure_latent_scale(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """1 / std of the posterior means of ``images`` ([B, 3, H, W] in [-1, 1])."""
    latent = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean
    return float(1.0 / latent.float().std().clamp_min(1e-6))


def psnr(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1] ([B, 3, H, W] each) -> [B]."""
    mse = ((reference - test) ** 2).flatten(1).mean(dim=1).clamp_min(1e-12)
    return 10.0 * torch.log10(1.0 / mse)
