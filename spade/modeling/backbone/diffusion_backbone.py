"""SPADE's backbone: the (calibrated) diffusion UNet as a detectron2 multi-scale feature extractor.

Shape shorthand: B batch, H x W padded image, C_l VAE latent channels, h x w latent (H/8 x W/8),
K implicit text tokens, C UNet cross_attention_dim, D CLIP joint embedding dim.

Pipeline of :meth:`DiffusionBackbone.forward` (input: the detectron2-normalised image batch):
1. un-normalise with MODEL.PIXEL_MEAN / PIXEL_STD (and INPUT.FORMAT) back to RGB in [0, 1];
2. VAE encoder (posterior mean) on 2x - 1 in [-1, 1] -> latent * latent_scale [B, C_l, h, w];
3. optional noise at DIFFUSION.TIMESTEP (fixed noise from DIFFUSION.NOISE_SEED: deterministic);
4. implicit text tokens [B, K, C] from CLIP (its own resize + normalisation) and the MLP adapter;
5. one UNet pass; outputs of the DIFFUSION.FEATURE_BLOCKS modules are captured by name;
6. per output ``resN`` (stride 2^N): blocks at that stride (else the nearest) are concatenated,
   projected by a light conv stage to OUT_CHANNELS and resampled to stride 2^N if needed.

The VAE and CLIP always run without grad; the UNet runs with grad only while LoRA or the adapter
is being trained (DIFFUSION.TRAIN_LORA / TRAIN_ADAPTER), otherwise without.

Feature cache (DIFFUSION.FEATURE_CACHE > 0 entries, training only): when nothing before the
projections trains, steps 1-5 are a fixed function of the image, so their captured block outputs
are kept per image (keyed by a hash of its pixels, least recently used dropped first) and reused
when the same augmented image comes back (INPUT.AUGMENTATION_SLOTS bounds how many versions of
an image training sees). Results equal those without the cache up to float rounding; it needs
TIMESTEP 0 (the fixed noise of t > 0 depends on an image's place in its batch).

Calibration (``from_config``): DIFFUSION.CALIBRATED_WEIGHTS loads stage 1's LoRA + adapter, after
checking that stage 1 held out every novel name of the training datasets (spade.provenance);
CALIBRATION.ENABLED False (the no-calibration ablation) builds the UNet without LoRA and keeps
the seeded, untrained adapter. What was loaded is recorded (:meth:`provenance`) in every stage-2
checkpoint and checked when one is loaded (:meth:`check_provenance`).
"""

import hashlib
import json
import logging
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from spade import provenance

from .feature_capture import BlockSpec, capture_outputs, probe_blocks, resolve_sources
from .implicit_text import ImplicitTextEncoder, build_implicit_text_encoder
from .loading import (
    ClipParts,
    DiffusionParts,
    build_clip,
    build_diffusion_parts,
    check_text_conditioning,
    clip_preprocess,
    num_unet_downsamples,
    vae_downsample_factor,
)
from .lora import apply_lora, has_lora, load_trainable_state_dict

__all__ = [
    "DiffusionBackbone",
    "build_diffusion_backbone",
    "clip_dense_features",
    "clip_patch_embeddings",
]

logger = logging.getLogger(__name__)
_RES_NAME = re.compile(r"^res(\d+)$")


class _Projection(nn.Module):
    """1x1 conv + GN + ReLU, 3x3 conv + GN, both at the source resolution, then resampling.

    An output finer than every captured block (res2 from stride-8 blocks) is bilinearly
    upsampled after the convs: the convs cost what they cost at the source stride.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: float):
        super().__init__()
        self.scale = scale
        self.reduce = Conv2d(
            in_channels,
            out_channels,
            1,
            bias=False,
            norm=get_norm("GN", out_channels),
            activation=F.relu,
        )
        self.smooth = Conv2d(
            out_channels, out_channels, 3, padding=1, bias=False, norm=get_norm("GN", out_channels)
        )
        weight_init.c2_xavier_fill(self.reduce)
        weight_init.c2_xavier_fill(self.smooth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.smooth(self.reduce(x))
        if self.scale > 1:
            x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        elif self.scale < 1:
            x = F.avg_pool2d(x, kernel_size=int(round(1 / self.scale)))
        return x


class DiffusionBackbone(Backbone):
    """The UNet feature extractor (see the module docstring for the pipeline).

    Attributes:
        clip: the frozen :class:`ClipParts` (not a registered submodule: not in ``state_dict``;
            ``.to()`` is forwarded to it). Shared with the implicit text encoder, never copied.
        vae, unet, implicit_text: registered; only LoRA / adapter / projections may train.
        blocks: the probed :class:`BlockSpec` of every captured UNet block.
    """

    @configurable
    def __init__(
        self,
        *,
        diffusion: DiffusionParts,
        clip: ClipParts,
        implicit_text: ImplicitTextEncoder,
        feature_blocks: Sequence[str],
        out_features: Sequence[str],
        out_channels: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        timestep: int = 0,
        noise_seed: int = 0,
        train_lora: bool = False,
        train_adapter: bool = False,
        train_projections: bool = True,
        merge_lora_for_inference: bool = False,
        calibration: Optional[dict] = None,
        feature_cache: int = 0,
    ):
        """
        Args:
            diffusion, clip, implicit_text: the parts (built by the factories in ``loading``).
            feature_blocks: UNet module names whose outputs are captured (e.g. "up_blocks.1").
            out_features: output names "resN" (stride 2^N), e.g. ["res2", "res3", "res4", "res5"].
            out_channels: channels of every output.
            pixel_mean, pixel_std: the meta-arch's normalisation (0-255 scale), 3 values each.
            input_format: "RGB" or "BGR" channel order of the input.
            timestep: t of the UNet pass (0 = clean latent, no noise).
            noise_seed: seed of the fixed noise added when ``timestep`` > 0.
            train_lora, train_adapter: keep grad for LoRA / the MLP adapter (UNet runs with grad).
            train_projections: the projection convs require grad.
            merge_lora_for_inference: fold LoRA into the UNet weights while in eval mode.
            calibration: the ``spade_calibration`` record of what the UNet / adapter were built
                from (spade.provenance); None = not recorded (parts built by hand).
            feature_cache: > 0: keep the captured UNet block outputs of up to this many training
                images and reuse them for the same image (module docstring); 0 = off. Needs
                LoRA and the adapter frozen.
        """
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(
                f"INPUT.FORMAT={input_format!r}: the diffusion backbone needs RGB or BGR"
            )
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError("MODEL.PIXEL_MEAN / PIXEL_STD must have 3 values for an RGB backbone")
        if not 0 <= int(timestep) < diffusion.scheduler.config.num_train_timesteps:
            raise ValueError(f"MODEL.SPADE.DIFFUSION.TIMESTEP={timestep} is outside the schedule")
        self.vae = diffusion.vae
        self.unet = diffusion.unet
        self.scheduler = diffusion.scheduler
        self.latent_scale = float(diffusion.latent_scale)
        self.implicit_text = implicit_text
        self.clip = clip  # a plain dataclass, not a submodule: frozen, shared, not in state_dict
        self.input_format = input_format
        self.timestep = int(timestep)
        self.noise_seed = int(noise_seed)
        self.train_lora = bool(train_lora)
        self.train_adapter = bool(train_adapter)
        self.merge_lora_for_inference = bool(merge_lora_for_inference) and has_lora(self.unet)
        self._lora_merged = False
        self.calibration = calibration
        if feature_cache < 0:
            raise ValueError(f"MODEL.SPADE.DIFFUSION.FEATURE_CACHE={feature_cache}: must be >= 0")
        if feature_cache and (self.train_lora or self.train_adapter):
            raise ValueError(
                "MODEL.SPADE.DIFFUSION.FEATURE_CACHE > 0 needs a frozen UNet pass: it cannot be "
                "used with DIFFUSION.TRAIN_LORA or DIFFUSION.TRAIN_ADAPTER"
            )
        if feature_cache and self.timestep > 0:
            raise ValueError(
                "MODEL.SPADE.DIFFUSION.FEATURE_CACHE > 0 needs DIFFUSION.TIMESTEP 0 (the fixed "
                "noise at t > 0 depends on an image's place in its batch)"
            )
        self.feature_cache_size = int(feature_cache)
        self._feature_cache: "OrderedDict[bytes, Dict[str, torch.Tensor]]" = OrderedDict()
        self.feature_cache_hits = self.feature_cache_misses = 0
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), False)

        latent_stride = vae_downsample_factor(self.vae)
        num_down = num_unet_downsamples(self.unet)
        self._size_divisibility = latent_stride * 2**num_down
        self.blocks: List[BlockSpec] = probe_blocks(
            self.unet, list(feature_blocks), latent_stride, num_down
        )
        self._set_trainable()

        self._out_features = list(out_features)
        self._out_feature_strides: Dict[str, int] = {}
        self._out_feature_channels: Dict[str, int] = {}
        self._sources: Dict[str, List[str]] = {}
        self.projections = nn.ModuleDict()
        for name in self._out_features:
            match = _RES_NAME.match(name)
            if match is None:
                raise ValueError(f"MODEL.SPADE.DIFFUSION.OUT_FEATURES: {name!r} is not 'resN'")
            stride = 2 ** int(match.group(1))
            sources = resolve_sources(self.blocks, stride)
            self._sources[name] = [b.name for b in sources]
            in_channels = sum(b.channels for b in sources)
            self.projections[name] = _Projection(
                in_channels, out_channels, sources[0].stride / stride
            )
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = int(out_channels)
        self.projections.requires_grad_(bool(train_projections))
        logger.info("DiffusionBackbone sources per output: %s", self._sources)

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None) -> dict:
        if input_shape is not None and input_shape.channels not in (None, 3):
            raise ValueError(
                f"DiffusionBackbone needs 3 input channels, got {input_shape.channels}"
            )
        d = cfg.MODEL.SPADE.DIFFUSION
        diffusion = build_diffusion_parts(cfg)
        clip = build_clip(cfg)
        # stage 1 calibrated this UNet under CLIP text conditioning: the pair must still match
        check_text_conditioning(diffusion, clip)
        implicit = build_implicit_text_encoder(
            cfg,
            clip,
            diffusion.unet.config.cross_attention_dim,
            seed=cfg.MODEL.SPADE.IMPLICIT_TEXT.SEED,
        )
        calibration = _load_calibration(cfg, diffusion.unet, implicit)
        return dict(
            diffusion=diffusion,
            clip=clip,
            implicit_text=implicit,
            feature_blocks=list(d.FEATURE_BLOCKS),
            out_features=list(d.OUT_FEATURES),
            out_channels=int(d.OUT_CHANNELS),
            pixel_mean=list(cfg.MODEL.PIXEL_MEAN),
            pixel_std=list(cfg.MODEL.PIXEL_STD),
            input_format=cfg.INPUT.FORMAT,
            timestep=int(d.TIMESTEP),
            noise_seed=int(d.NOISE_SEED),
            train_lora=bool(d.TRAIN_LORA),
            train_adapter=bool(d.TRAIN_ADAPTER),
            train_projections=bool(d.TRAIN_BACKBONE_PROJ),
            merge_lora_for_inference=bool(cfg.MODEL.SPADE.LORA.MERGE_FOR_INFERENCE),
            calibration=calibration,
            feature_cache=int(d.FEATURE_CACHE),
        )

    # ------------------------------------------------------------------ detectron2 Backbone API

    @property
    def size_divisibility(self) -> int:
        """VAE factor x 2^(UNet downsamples): 64 for SD 1.5 and the default TINY preset."""
        return self._size_divisibility

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """images: normalised [B, 3, H, W], H and W multiples of size_divisibility.

        Returns {name: [B, OUT_CHANNELS, H / stride, W / stride]} for every OUT_FEATURES name.
        """
        self._check_input(images)
        self._sync_lora_merge()
        if self.training and self.feature_cache_size > 0:
            captured = self._cached_unet_features(images)
        else:
            captured = self._unet_features_of_images(images)
        outputs = {}
        for name in self._out_features:
            x = torch.cat([captured[n] for n in self._sources[name]], dim=1)
            outputs[name] = self.projections[name](x.to(self.pixel_mean.dtype))
        return outputs

    # ------------------------------------------------------------------ named steps

    def _unet_features_of_images(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Steps 1-5 of the pipeline: normalised images -> {block name: [B, c, h', w']}."""
        unit = self.unit_rgb(images)
        latent = self.encode_latent(unit)
        context = self.implicit_text(clip_preprocess(unit, self.clip))
        grad = self.training and (self.train_lora or self.train_adapter)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.unet_features(latent, context)

    def _cached_unet_features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """:meth:`_unet_features_of_images` through the feature cache: only images not seen
        before (by a hash of their pixels) run the VAE, CLIP and the UNet."""
        keys = []
        for image in images.detach():
            pixels = image.to("cpu", torch.float32).contiguous().numpy()
            digest = hashlib.blake2b(pixels.tobytes(), digest_size=16)
            digest.update(str(tuple(pixels.shape)).encode())
            keys.append(digest.digest())
        # the first place of each image the cache lacks: one pass per distinct image
        missing = [
            i for i, k in enumerate(keys) if k not in self._feature_cache and keys.index(k) == i
        ]
        if missing:
            with torch.no_grad():
                fresh = self._unet_features_of_images(images[missing])
            for row, i in enumerate(missing):
                self._feature_cache[keys[i]] = {n: f[row].clone() for n, f in fresh.items()}
        self.feature_cache_misses += len(missing)
        self.feature_cache_hits += len(keys) - len(missing)
        entries = [self._feature_cache[k] for k in keys]
        for k in keys:
            self._feature_cache.move_to_end(k)
        while len(self._feature_cache) > self.feature_cache_size:
            self._feature_cache.popitem(last=False)
        return {n: torch.stack([e[n] for e in entries]) for n in entries[0]}

    def unit_rgb(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the meta-arch normalisation: [B, 3, H, W] -> RGB in [0, 1]."""
        raw = images * self.pixel_std + self.pixel_mean
        if self.input_format == "BGR":
            raw = raw.flip(1)
        return (raw / 255.0).clamp(0.0, 1.0)

    def encode_latent(self, unit: torch.Tensor) -> torch.Tensor:
        """RGB [0, 1] [B, 3, H, W] -> (noised) scaled VAE latent [B, C_l, H/8, W/8], no grad."""
        dtype = self.vae.dtype
        with torch.no_grad():
            posterior = self.vae.encode((unit * 2.0 - 1.0).to(dtype)).latent_dist
            latent = posterior.mean * self.latent_scale
            if self.timestep > 0:
                generator = torch.Generator().manual_seed(self.noise_seed)
                noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32)
                t = torch.full((latent.shape[0],), self.timestep, dtype=torch.long)
                latent = self.scheduler.add_noise(latent.float().cpu(), noise, t)
                latent = latent.to(device=unit.device, dtype=dtype)
        return latent

    def unet_features(self, latent: torch.Tensor, context: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One UNet pass at TIMESTEP; returns {block name: [B, c, h', w']} of captured blocks."""
        t = torch.full((latent.shape[0],), self.timestep, device=latent.device, dtype=torch.long)
        with capture_outputs(self.unet, [b.name for b in self.blocks]) as store:
            self.unet(latent, t, encoder_hidden_states=context.to(latent.dtype))
        return dict(store)

    def clip_dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """Dense CLIP features in the joint space for mask pooling: [B, D, g, g].

        images: the same normalised tensor given to forward(). They are resized to CLIP's input
        size (aspect ratio not kept; masks resized to the g x g grid line up the same way).
        """
        return clip_dense_features(self.clip, clip_preprocess(self.unit_rgb(images), self.clip))

    def clip_crop_embeddings(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings of image regions, for region classification: [B, N, D].

        images: the same normalised tensor given to forward() [B, 3, H, W]; boxes: [B, N, 4]
        xyxy pixel boxes of it. Each box is cut out (bilinear, torchvision's ``roi_align``),
        resized to CLIP's input size and encoded by the image tower. Not normalised; no grad.
        """
        return clip_crop_embeddings(self.clip, self.unit_rgb(images), boxes)

    # ------------------------------------------------------------------ modes and trainability

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen foundation models stay in eval mode (no dropout / norm statistic updates)
        self.vae.eval()
        self.unet.eval()
        self.clip.model.eval()
        if mode and self._lora_merged:
            self.unet.unfuse_lora()
            self._lora_merged = False
        return self

    def frozen_state_prefixes(self) -> List[str]:
        """State-dict prefixes rebuilt at start-up from their own files (pretrained UNet / VAE,
        stage-1 LoRA + adapter), so checkpoints leave them out (spade.engine.checkpoint)."""
        parts = {"vae": self.vae, "unet": self.unet, "implicit_text": self.implicit_text}
        return [
            f"{name}."
            for name, module in parts.items()
            if not any(p.requires_grad for p in module.parameters())
        ]

    def provenance(self) -> Dict[str, str]:
        """Checkpoint metadata: the ``spade_calibration`` record (spade.provenance)."""
        if self.calibration is None:
            return {}
        return {provenance.CALIBRATION_KEY: json.dumps(self.calibration, sort_keys=True)}

    def check_provenance(self, metadata: Dict[str, str], checkpoint: str) -> None:
        """Refuse a checkpoint trained on other stage-1 weights than this backbone was built
        with (or recording none); no-op for a backbone built by hand."""
        if self.calibration is None:
            return
        recorded = provenance.read_record(metadata, provenance.CALIBRATION_KEY, checkpoint)
        provenance.check_recorded_calibration(recorded, self.calibration, checkpoint)

    def _apply(self, fn, recurse: bool = True):
        self.clip.model._apply(fn)  # forward .to() / .half() to the unregistered CLIP
        return super()._apply(fn, recurse)

    def _sync_lora_merge(self) -> None:
        if self.merge_lora_for_inference and not self.training and not self._lora_merged:
            self.unet.fuse_lora()
            self._lora_merged = True

    def _set_trainable(self) -> None:
        for name, param in self.unet.named_parameters():
            trainable_unet_part = ".lora_" in name if has_lora(self.unet) else param.requires_grad
            param.requires_grad_(self.train_lora and trainable_unet_part)
        self.vae.requires_grad_(False)
        self.implicit_text.adapter.requires_grad_(self.train_adapter)

    def _check_input(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"DiffusionBackbone expects [B, 3, H, W] images, got {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        if h % self._size_divisibility or w % self._size_divisibility:
            raise ValueError(
                f"DiffusionBackbone input {h}x{w} is not a multiple of size_divisibility "
                f"{self._size_divisibility}; pad the batch (ImageList.from_tensors)"
            )


def _load_calibration(cfg, unet: nn.Module, implicit: ImplicitTextEncoder) -> dict:
    """LoRA + calibrated weights of stage 2 as the config asks; returns the calibration record.

    CALIBRATION.ENABLED False: no LoRA, adapter untrained (CALIBRATED_WEIGHTS / TRAIN_LORA set
    too is a ValueError). Otherwise LoRA when enabled, trained or loaded, and CALIBRATED_WEIGHTS
    loaded after the leakage check against every training dataset's ov_split."""
    d, lora = cfg.MODEL.SPADE.DIFFUSION, cfg.MODEL.SPADE.LORA
    if not cfg.CALIBRATION.ENABLED:
        for key, value in (
            ("CALIBRATED_WEIGHTS", d.CALIBRATED_WEIGHTS),
            ("TRAIN_LORA", d.TRAIN_LORA),
        ):
            if value:
                raise ValueError(
                    f"CALIBRATION.ENABLED is False (no-calibration ablation) but "
                    f"MODEL.SPADE.DIFFUSION.{key} is {value!r}; unset one of them"
                )
        logger.info("No calibration: UNet without LoRA, implicit-text adapter untrained")
        return provenance.calibration_record(False, "")
    if lora.ENABLED or d.TRAIN_LORA or d.CALIBRATED_WEIGHTS:
        apply_lora(unet, lora, seed=lora.SEED)
    if not d.CALIBRATED_WEIGHTS:
        logger.warning(
            "MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS is empty: the UNet is uncalibrated (zero "
            "LoRA, untrained adapter); checkpoints record calibration 'none'"
        )
        return provenance.calibration_record(True, "")
    path = d.CALIBRATED_WEIGHTS
    meta = load_trainable_state_dict(path, unet, implicit)
    stage1 = provenance.read_record(meta, provenance.STAGE1_KEY, path)
    for name in cfg.DATASETS.TRAIN:
        ov = MetadataCatalog.get(name).get("ov_split", None)
        provenance.check_no_leakage(stage1, ov, path, name)
    logger.info("Loaded calibrated LoRA + adapter from %s", path)
    return provenance.calibration_record(True, path, stage1)


def clip_dense_features(clip: ClipParts, pixels: torch.Tensor) -> torch.Tensor:
    """Patch tokens of CLIP's image tower, after ln_post, projected to the joint space.

    Args:
        clip: frozen CLIP parts.
        pixels: CLIP-normalised images [B, 3, S, S] at clip.image_size.
    Returns:
        [B, D, S / patch, S / patch], no grad.
    """
    visual = clip.model.visual
    weight = next(visual.parameters())
    with torch.no_grad():
        return clip_patch_embeddings(visual, pixels.to(weight.dtype))


def clip_crop_embeddings(clip: ClipParts, unit: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings [B, N, D] of the boxes [B, N, 4] (xyxy pixels) of RGB images in
    [0, 1] [B, 3, H, W]: crop-and-resize to clip.image_size, CLIP-normalise, encode. No grad."""
    from torchvision.ops import roi_align

    B, N = boxes.shape[:2]
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or len(unit) != B:
        raise ValueError(
            f"clip_crop_embeddings: boxes must be [B={len(unit)}, N, 4], got {tuple(boxes.shape)}"
        )
    if N == 0:
        return unit.new_zeros(B, 0, clip.embed_dim)
    size = clip.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    weight = next(clip.model.visual.parameters())
    with torch.no_grad():
        crops = roi_align(
            unit.float(), list(boxes.float().unbind(0)), output_size=size, aligned=True
        )  # [B * N, 3, h, w], already at CLIP's size: clip_preprocess only normalises
        embeddings = clip.model.encode_image(clip_preprocess(crops, clip).to(weight.dtype))
    return embeddings.float().view(B, N, -1)


def clip_patch_embeddings(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """What :func:`clip_dense_features` returns, with autograd (CLIP pretraining trains it).

    visual: open_clip's ``VisionTransformer``; pixels: [B, 3, S, S] CLIP-normalised.
    Returns [B, D, S / patch, S / patch]: the last block's patch tokens after ln_post, times proj.
    """
    out = visual.forward_intermediates(
        pixels,
        indices=1,
        normalize_intermediates=True,
        intermediates_only=True,
        output_fmt="NCHW",
    )
    tokens = out["image_intermediates"][-1]
    if getattr(visual, "proj", None) is not None:
        tokens = torch.einsum("bchw,cd->bdhw", tokens, visual.proj)
    return tokens


@BACKBONE_REGISTRY.register()
def build_diffusion_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> DiffusionBackbone:
    """BACKBONE_REGISTRY entry: ``MODEL.BACKBONE.NAME: "build_diffusion_backbone"``."""
    return DiffusionBackbone(cfg, input_shape)
