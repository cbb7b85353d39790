"""Factories for SPADE's frozen foundation models: the diffusion VAE / UNet / scheduler and CLIP.

Nothing here runs at import time; every weight is read inside a ``build_*`` call.

* ``MODEL.SPADE.DIFFUSION.PRETRAINED``: a diffusers-format directory (``vae/``, ``unet/``,
  ``scheduler/``) or a hub id. ``""`` builds the TINY preset from ``MODEL.SPADE.DIFFUSION.TINY``.
* ``MODEL.SPADE.CLIP.MODEL_NAME`` + ``PRETRAINED``: an open_clip model name (or ``local-dir:``
  schema) with a checkpoint path (``.safetensors`` or a plain tensor state dict; loaded with
  ``weights_only``), or ``PRETRAINED`` = a folder in open_clip's hub layout
  (``open_clip_config.json`` + ``open_clip_model.safetensors``, as a downloaded
  ``laion/CLIP-ViT-L-14-...`` repository or the project's shipped tiny CLIP), loaded through
  open_clip's ``local-dir:`` path; ``MODEL_NAME`` then names it (checked against an open_clip
  built-in config of that name, or against the folder's manifest). ``MODEL_NAME: "TINY"`` without
  ``PRETRAINED`` builds a random 2-layer CLIP from ``MODEL.SPADE.CLIP.TINY`` (unit tests).
* A model folder with a ``spade_manifest.json`` (the project's pretrained miniature models) is
  verified file by file against the SHA-256 hashes it records before anything is loaded.

A configured path that does not exist raises FileNotFoundError naming the config key; there is
never a silent random init. The TINY CLIP uses open_clip's own BPE tokenizer (its vocabulary ships
with the package) with SD's context length 77, and its text width equals the TINY UNet's
cross_attention_dim, so the teacher can be conditioned on :func:`encode_text_tokens` output.

Shape shorthand: N texts, L context length (77), W text width, B batch.
"""

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

import open_clip
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer

from spade.utils.manifest import verify_model_folder

__all__ = [
    "DiffusionParts",
    "ClipParts",
    "build_diffusion_parts",
    "build_clip",
    "load_clip_folder",
    "resolve_weights_path",
    "clip_model_config",
    "check_text_conditioning",
    "tokenize",
    "sd_tokenize",
    "encode_text_tokens",
    "clip_preprocess",
    "num_unet_downsamples",
    "vae_downsample_factor",
    "tiny_unet_config",
    "tiny_vae_config",
    "autoencoder_kl_config",
    "tiny_clip_model",
]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TINY_HEAD_WIDTH = 8  # attention head width of the TINY CLIP towers
_CLIP_CONTEXT_LENGTH = 77  # SD's text context length
_CLIP_VOCAB_SIZE = 49408  # open_clip's BPE vocabulary (sot/eot included)


@dataclass
class DiffusionParts:
    """The frozen diffusion model parts.

    Attributes:
        vae: AutoencoderKL; image [-1, 1] [B, 3, H, W] -> latent [B, C, H/8, W/8].
        unet: UNet2DConditionModel (noise prediction, conditioned on [B, L, cross_attention_dim]).
        scheduler: DDIMScheduler with the model's training noise schedule.
        latent_scale: multiply VAE latents by this before the UNet (vae.config.scaling_factor).
    """

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    latent_scale: float


@dataclass
class ClipParts:
    """A frozen open_clip model with what is needed to feed it.

    Attributes:
        model: open_clip ``CLIP`` (``.visual`` image tower, text tower attributes).
        tokenizer: callable ``list[str] -> LongTensor [N, L]`` (open_clip tokenizer).
        image_mean, image_std: per-channel normalisation of [0, 1] RGB images.
        image_size: (height, width) input size of the image tower.
        embed_dim: D, the joint image-text embedding dim.
        text_width: W, width of the text tower's token states (the teacher's conditioning width).
    """

    model: torch.nn.Module
    tokenizer: Callable
    image_mean: Tuple[float, float, float]
    image_std: Tuple[float, float, float]
    image_size: Tuple[int, int]
    embed_dim: int
    text_width: int


# --------------------------------------------------------------------------- diffusion parts


def tiny_unet_config(cfg: CfgNode) -> dict:
    """UNet2DConditionModel kwargs of the TINY preset (SD 1.5's block layout, shrunk).

    The first ``n - 1`` blocks are cross-attention blocks (so ``attn2`` layers exist), the last is
    a plain block, as in SD 1.5; ``n = len(BLOCK_OUT_CHANNELS)`` gives ``n - 1`` downsamples.
    """
    t = cfg.MODEL.SPADE.DIFFUSION.TINY
    channels = tuple(int(c) for c in t.BLOCK_OUT_CHANNELS)
    if len(channels) < 2:
        raise ValueError(
            "MODEL.SPADE.DIFFUSION.TINY.BLOCK_OUT_CHANNELS needs at least 2 entries, "
            f"got {channels}"
        )
    if int(t.CROSS_ATTENTION_DIM) != int(cfg.MODEL.SPADE.CLIP.TINY.WIDTH) and _is_tiny_clip(cfg):
        raise ValueError(
            "MODEL.SPADE.DIFFUSION.TINY.CROSS_ATTENTION_DIM "
            f"({t.CROSS_ATTENTION_DIM}) must equal MODEL.SPADE.CLIP.TINY.WIDTH "
            f"({cfg.MODEL.SPADE.CLIP.TINY.WIDTH}) so CLIP token states can condition the UNet"
        )
    n = len(channels)
    return dict(
        sample_size=8 * 2 ** (n - 1),
        in_channels=int(t.LATENT_CHANNELS),
        out_channels=int(t.LATENT_CHANNELS),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=channels,
        layers_per_block=int(t.LAYERS_PER_BLOCK),
        attention_head_dim=int(t.ATTENTION_HEAD_DIM),
        cross_attention_dim=int(t.CROSS_ATTENTION_DIM),
        norm_num_groups=_group_count(channels),
    )


def tiny_vae_config(cfg: CfgNode) -> dict:
    """AutoencoderKL kwargs of the TINY preset (downsampling 2^(len(VAE_BLOCK_OUT_CHANNELS)-1))."""
    t = cfg.MODEL.SPADE.DIFFUSION.TINY
    return autoencoder_kl_config(
        t.VAE_BLOCK_OUT_CHANNELS, 1, t.LATENT_CHANNELS, sample_size=64, scaling_factor=0.18215
    )


def autoencoder_kl_config(
    channels: Sequence[int],
    layers_per_block: int,
    latent_channels: int,
    sample_size: int,
    scaling_factor: float,
) -> dict:
    """AutoencoderKL kwargs of SD's VAE layout with ``len(channels) - 1`` downsamplings."""
    channels = tuple(int(c) for c in channels)
    n = len(channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=channels,
        layers_per_block=int(layers_per_block),
        latent_channels=int(latent_channels),
        norm_num_groups=_group_count(channels),
        sample_size=int(sample_size),
        scaling_factor=float(scaling_factor),
    )


def unit_variance_latent_scale(vae: AutoencoderKL, size: int = 64, seed: int = 0) -> float:
    """The latent scaling factor that gives unit-variance latents, measured on a seeded probe batch.

    Stable Diffusion's 0.18215 was chosen the same way for its trained VAE; a random TINY VAE has
    latents about 5x smaller than SD's, and with SD's factor they would reach the UNet ~30x too
    weak (std ~0.03), starving every feature downstream.
    """
    g = torch.Generator().manual_seed(seed)
    probe = torch.rand(4, 3, size, size, generator=g) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(probe).latent_dist.mean
    return float(1.0 / latent.std().clamp_min(1e-6))


def sd_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion's training schedule (scaled_linear 0.00085-0.012, 1000 steps)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_diffusion_parts(cfg: CfgNode) -> DiffusionParts:
    """Build the frozen VAE, UNet and DDIM scheduler named by ``MODEL.SPADE.DIFFUSION``.

    Returns parts in eval mode with ``requires_grad`` False and dtype ``DIFFUSION.DTYPE``.
    Raises FileNotFoundError when ``DIFFUSION.PRETRAINED`` is neither a directory nor a reachable
    hub id, and ValueError when ``MODEL.SPADE.PRESET`` is "PRETRAINED" without weights.
    """
    d = cfg.MODEL.SPADE.DIFFUSION
    source = resolve_weights_path(str(d.PRETRAINED))
    dtype = _dtype(d.DTYPE, "MODEL.SPADE.DIFFUSION.DTYPE")
    if not source:
        _require_not_pretrained_preset(cfg, "MODEL.SPADE.DIFFUSION.PRETRAINED")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(d.TINY.SEED))
            unet = UNet2DConditionModel(**tiny_unet_config(cfg))
            vae = AutoencoderKL(**tiny_vae_config(cfg))
            vae.register_to_config(scaling_factor=unit_variance_latent_scale(vae))
        scheduler = sd_scheduler()
    else:
        _check_source(source, "MODEL.SPADE.DIFFUSION.PRETRAINED")
        if os.path.isdir(source):
            for sub in ("vae", "unet"):
                verify_model_folder(os.path.join(source, sub), "MODEL.SPADE.DIFFUSION.PRETRAINED")
        try:
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype)
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
            scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler")
        except OSError as e:
            raise FileNotFoundError(
                f"MODEL.SPADE.DIFFUSION.PRETRAINED={source!r}: could not load a diffusers model "
                f"with vae/, unet/ and scheduler/ subfolders ({e})"
            ) from e
        logger.info("Loaded diffusion VAE/UNet/scheduler from %s", source)
    for module in (vae, unet):
        if module.dtype != dtype:
            module.to(dtype=dtype)
        module.eval().requires_grad_(False)
    return DiffusionParts(vae, unet, scheduler, float(vae.config.scaling_factor))


def num_unet_downsamples(unet: UNet2DConditionModel) -> int:
    """Number of 2x downsamplings in the UNet's encoder."""
    return sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))


def vae_downsample_factor(vae: AutoencoderKL) -> int:
    """Spatial factor from image to latent (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


# --------------------------------------------------------------------------- CLIP


def tiny_clip_model(cfg: CfgNode) -> torch.nn.Module:
    """A seeded 2-layer (``CLIP.TINY.LAYERS``) open_clip ``CLIP`` built from vision/text cfgs."""
    t = cfg.MODEL.SPADE.CLIP.TINY
    width = int(t.WIDTH)
    if width % _TINY_HEAD_WIDTH:
        raise ValueError(
            f"MODEL.SPADE.CLIP.TINY.WIDTH ({width}) must be a multiple of {_TINY_HEAD_WIDTH}"
        )
    if int(t.IMAGE_SIZE) % int(t.PATCH_SIZE):
        raise ValueError(
            f"MODEL.SPADE.CLIP.TINY.IMAGE_SIZE ({t.IMAGE_SIZE}) must be a multiple of "
            f"MODEL.SPADE.CLIP.TINY.PATCH_SIZE ({t.PATCH_SIZE})"
        )
    vision = CLIPVisionCfg(
        layers=int(t.LAYERS),
        width=width,
        head_width=_TINY_HEAD_WIDTH,
        patch_size=int(t.PATCH_SIZE),
        image_size=int(t.IMAGE_SIZE),
    )
    text = CLIPTextCfg(
        context_length=_CLIP_CONTEXT_LENGTH,
        vocab_size=_CLIP_VOCAB_SIZE,
        width=width,
        heads=width // _TINY_HEAD_WIDTH,
        layers=int(t.LAYERS),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(t.SEED))
        return open_clip.CLIP(embed_dim=int(t.EMBED_DIM), vision_cfg=vision, text_cfg=text)


def build_clip(cfg: CfgNode) -> ClipParts:
    """Build the frozen CLIP named by ``MODEL.SPADE.CLIP`` (eval mode, no grad).

    Raises FileNotFoundError when ``CLIP.PRETRAINED`` is set but is neither an existing file nor
    an open_clip pretrained tag of ``CLIP.MODEL_NAME``.
    """
    c = cfg.MODEL.SPADE.CLIP
    name, pretrained = str(c.MODEL_NAME), resolve_weights_path(str(c.PRETRAINED))
    if pretrained and os.path.isdir(pretrained):
        model, tokenizer, mean, std = _load_open_clip_folder(name, pretrained)
    elif name == "TINY":
        model = tiny_clip_model(cfg)
        if pretrained:
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(
                    f"MODEL.SPADE.CLIP.PRETRAINED={pretrained!r} does not exist (TINY CLIP weights)"
                )
            open_clip.load_checkpoint(model, pretrained, strict=True, weights_only=True)
        else:
            _require_not_pretrained_preset(cfg, "MODEL.SPADE.CLIP.PRETRAINED")
        tokenizer = SimpleTokenizer(context_length=_CLIP_CONTEXT_LENGTH)
        mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    else:
        if (
            pretrained
            and not os.path.isfile(pretrained)
            and not _is_open_clip_tag(name, pretrained)
        ):
            raise FileNotFoundError(
                f"MODEL.SPADE.CLIP.PRETRAINED={pretrained!r} is neither an existing checkpoint "
                "file, an open_clip hub folder, nor an open_clip pretrained tag of "
                f"MODEL.SPADE.CLIP.MODEL_NAME={name!r}"
            )
        if not pretrained and not name.startswith(("local-dir:", "hf-hub:")):
            _require_not_pretrained_preset(cfg, "MODEL.SPADE.CLIP.PRETRAINED")
            logger.warning(
                "MODEL.SPADE.CLIP.PRETRAINED is empty: %s is built with RANDOM weights", name
            )
        model = open_clip.create_model(name, pretrained=pretrained or None, weights_only=True)
        tokenizer = open_clip.get_tokenizer(name)
        pp = open_clip.get_model_preprocess_cfg(model)
        mean = tuple(pp.get("mean", OPENAI_DATASET_MEAN))
        std = tuple(pp.get("std", OPENAI_DATASET_STD))
    return _clip_parts(model, tokenizer, mean, std)


def clip_model_config(cfg: CfgNode):
    """open_clip ``model_cfg`` of MODEL.SPADE.CLIP without loading weights: the folder's
    open_clip_config.json when CLIP.PRETRAINED is an open_clip hub folder, else the built-in
    config of CLIP.MODEL_NAME (None when neither exists)."""
    folder = resolve_weights_path(str(cfg.MODEL.SPADE.CLIP.PRETRAINED))
    config_path = os.path.join(folder, "open_clip_config.json")
    if folder and os.path.isfile(config_path):
        with open(config_path) as f:
            return json.load(f).get("model_cfg")
    return open_clip.get_model_config(str(cfg.MODEL.SPADE.CLIP.MODEL_NAME))


def load_clip_folder(folder: str, name: str = "") -> ClipParts:
    """A frozen CLIP from an open_clip hub-layout folder (the ``CLIP.PRETRAINED`` folder path)."""
    return _clip_parts(*_load_open_clip_folder(name, folder))


def _clip_parts(model, tokenizer, mean, std) -> ClipParts:
    model.eval().requires_grad_(False)
    size = model.visual.image_size
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return ClipParts(
        model=model,
        tokenizer=tokenizer,
        image_mean=tuple(float(m) for m in mean),
        image_std=tuple(float(s) for s in std),
        image_size=size,
        embed_dim=int(model.visual.output_dim),
        text_width=int(model.token_embedding.weight.shape[1]),
    )


def _load_open_clip_folder(name: str, folder: str):
    """An open_clip hub-layout folder through open_clip's ``local-dir:`` path (see module doc)."""
    key = "MODEL.SPADE.CLIP.PRETRAINED"
    config_path = os.path.join(folder, "open_clip_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{key}={folder!r} is a folder without open_clip_config.json (open_clip's hub layout: "
            "open_clip_config.json + open_clip_model.safetensors)"
        )
    manifest = verify_model_folder(folder, key)
    try:
        with open(config_path) as f:
            folder_cfg = json.load(f)["model_cfg"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{key}: {config_path} has no readable 'model_cfg' ({e})") from e
    builtin = open_clip.get_model_config(name) if name not in ("", "TINY") else None
    if builtin is not None and builtin != folder_cfg:
        raise ValueError(
            f"MODEL.SPADE.CLIP.MODEL_NAME={name!r} is an open_clip model whose config differs "
            f"from {config_path} ({key}={folder!r}): they name different models"
        )
    recorded = (manifest or {}).get("model_name")
    if builtin is None and name and recorded and name != recorded:
        raise ValueError(
            f"MODEL.SPADE.CLIP.MODEL_NAME={name!r} but {folder}/spade_manifest.json records "
            f"model_name {recorded!r} ({key}={folder!r})"
        )
    try:
        model = open_clip.create_model(f"local-dir:{folder}", weights_only=True)
    except Exception as e:  # open_clip / safetensors raise their own types on bad files
        raise ValueError(f"{key}={folder!r}: open_clip could not load the folder ({e})") from e
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    pp = open_clip.get_model_preprocess_cfg(model)
    mean = tuple(pp.get("mean", OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", OPENAI_DATASET_STD))
    logger.info("Loaded CLIP %s from %s", name or "(unnamed)", folder)
    return model, tokenizer, mean, std


def check_text_conditioning(diffusion: DiffusionParts, clip_parts: ClipParts) -> None:
    """Raise ValueError unless CLIP's token states can condition the UNet (widths agree)."""
    cross = int(diffusion.unet.config.cross_attention_dim)
    if cross != clip_parts.text_width:
        raise ValueError(
            f"the UNet's cross_attention_dim ({cross}) differs from the CLIP text width "
            f"({clip_parts.text_width}): MODEL.SPADE.DIFFUSION and MODEL.SPADE.CLIP do not match"
        )


def tokenize(clip_parts: ClipParts, texts: Sequence[str]) -> torch.Tensor:
    """Tokenize ``texts`` with the CLIP tokenizer -> LongTensor [N, L] on the model's device."""
    if isinstance(texts, str):
        raise TypeError("tokenize expects a list of strings, got a single str")
    device = clip_parts.model.token_embedding.weight.device
    return clip_parts.tokenizer(list(texts)).to(device)


def sd_tokenize(clip_parts: ClipParts, texts: Sequence[str]) -> torch.Tensor:
    """Tokens [N, L] padded as SD 1.5's tokenizer pads: end-of-text from the first one onwards.

    open_clip's tokenizer pads with id 0; SD 1.5's CLIPTokenizer pads with ``<|endoftext|>``, and
    the UNet was trained on the text states of that padding. Tokenizers without an
    ``eot_token_id`` are left as they are.
    """
    tokens = tokenize(clip_parts, texts)
    eot = getattr(clip_parts.tokenizer, "eot_token_id", None)
    if eot is None:
        return tokens
    after_eot = (tokens == int(eot)).long().cumsum(dim=-1) > 0
    return torch.where(after_eot, torch.full_like(tokens, int(eot)), tokens)


def encode_text_tokens(clip_parts: ClipParts, texts: Sequence[str]) -> torch.Tensor:
    """Per-token hidden states of CLIP's text tower after ``ln_final``: [N, L, W].

    This is what SD 1.5's text encoder (OpenAI CLIP ViT-L/14's text tower) gives the UNet as
    ``encoder_hidden_states``, so it serves as the teacher's text encoder (and conditions the
    project's own tiny UNet in pretraining). As SD 1.5's tokenizer does, the positions after the
    end-of-text token are padded with the end-of-text token (open_clip pads with 0): see
    :func:`sd_tokenize`. Runs without grad.
    """
    model = clip_parts.model
    tokens = sd_tokenize(clip_parts, texts)
    with torch.no_grad():
        out = model.forward_intermediates(text=tokens, text_indices=1, intermediates_only=True)
        # the last block's output, before ln_final
        hidden = model.ln_final(out["text_intermediates"][-1])
    return hidden


def clip_preprocess(images: torch.Tensor, clip_parts: ClipParts) -> torch.Tensor:
    """Resize RGB images in [0, 1] [B, 3, H, W] to CLIP's input size and normalise them."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"clip_preprocess expects [B, 3, H, W] images, got {tuple(images.shape)}")
    x = F.interpolate(images, size=clip_parts.image_size, mode="bilinear", align_corners=False)
    mean = torch.tensor(clip_parts.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(clip_parts.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- helpers


def _group_count(channels: Sequence[int]) -> int:
    """Largest GroupNorm group count <= 32 dividing every channel count."""
    g = 0
    for c in channels:
        g = math.gcd(g, int(c))
    return max(d for d in range(1, min(32, g) + 1) if g % d == 0)


def _dtype(name: str, key: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{key}={name!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _is_tiny_clip(cfg: CfgNode) -> bool:
    return str(cfg.MODEL.SPADE.CLIP.MODEL_NAME) == "TINY"


def _require_not_pretrained_preset(cfg: CfgNode, key: str) -> None:
    if str(cfg.MODEL.SPADE.PRESET) == "PRETRAINED":
        raise ValueError(f"MODEL.SPADE.PRESET is 'PRETRAINED' but {key} is empty")


_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def resolve_weights_path(path: str) -> str:
    """A relative weights path that does not exist from the working directory but does from the
    repository root (the shipped ``models/...`` folders) resolves there; anything else (absolute
    paths, hub ids, tags, "") is returned unchanged."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(os.path.abspath(_REPO_ROOT), path)
    return candidate if os.path.exists(candidate) else path


def _check_source(source: str, key: str) -> None:
    """A local path must exist; a string shaped like a hub id may name a remote model."""
    if os.path.isdir(source):
        return
    looks_local = source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_local or not _HUB_ID.match(source):
        raise FileNotFoundError(f"{key}={source!r}: directory does not exist")


def _is_open_clip_tag(name: str, tag: str) -> bool:
    try:
        return tag in open_clip.list_pretrained_tags_by_model(name)
    except Exception:  # unknown model names have no tags
        return False
