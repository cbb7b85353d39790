"""Tiny text-to-image UNet: a diffusers ``UNet2DConditionModel`` trained as Stable Diffusion is.

Conditioning is SD 1.5's: the per-token hidden states of the frozen CLIP text tower after its final
LayerNorm (``encode_text_tokens``, [B, 77, W]) feed every cross-attention layer; the frozen tiny VAE
gives the latents (posterior mean times its scaling factor); the target is the noise (epsilon
prediction) at a uniform timestep of SD's scaled-linear schedule (beta 0.00085 -> 0.012, 1000
steps); ``CAPTION_DROPOUT`` of the captions are empty, for classifier-free guidance.

Latents of the corpus are cached in a memory-mapped file (:class:`LatentCache`), computed in a
pass of their own before training (``PRETRAIN.UNET.FILL_LATENT_CACHE``) or as batches first need
them, so the VAE encoder runs once per image across epochs, runs and resumes.

One concession to the CPU, documented in the config: the finest level keeps its cross-attention
but replaces the self-attention by a second cross-attention (diffusers' ``only_cross_attention``
for that level), since self-attention over 32 x 32 tokens costs most of an iteration there.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import asdict
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.utils import comm
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from spade.modeling.backbone.loading import (
    ClipParts,
    encode_text_tokens,
    sd_scheduler,
)
from spade.utils.io import atomic_write_bytes

from .corpus import Corpus
from .vae import to_vae_input

__all__ = ["unet_config", "UnetPretrainModel", "LatentCache", "unet_batches"]


def unet_config(cfg, cross_attention_dim: int, latent_channels: int, sample_size: int) -> dict:
    """UNet2DConditionModel kwargs from PRETRAIN.UNET (SD 1.5's block layout, shrunk)."""
    u = cfg.PRETRAIN.UNET
    channels = tuple(int(c) for c in u.BLOCK_OUT_CHANNELS)
    levels = tuple(bool(v) for v in u.CROSS_ATTENTION_LEVELS)
    if len(levels) != len(channels):
        raise ValueError(
            "PRETRAIN.UNET.CROSS_ATTENTION_LEVELS needs one entry per BLOCK_OUT_CHANNELS level"
        )
    heads = int(u.ATTENTION_HEAD_DIM)  # diffusers' name; it is the number of heads per layer
    if int(u.HEAD_CHANNELS) > 0:
        width = int(u.HEAD_CHANNELS)
        if any(c % width for c in channels):
            raise ValueError(
                f"PRETRAIN.UNET.HEAD_CHANNELS={width} does not divide every "
                f"PRETRAIN.UNET.BLOCK_OUT_CHANNELS {list(channels)}"
            )
        heads = tuple(c // width for c in channels)
    only_cross = tuple(bool(v) for v in u.ONLY_CROSS_ATTENTION_LEVELS) or (False,) * len(levels)
    if len(only_cross) != len(levels):
        raise ValueError("PRETRAIN.UNET.ONLY_CROSS_ATTENTION_LEVELS needs one entry per level")
    return dict(
        sample_size=int(sample_size),
        in_channels=int(latent_channels),
        out_channels=int(latent_channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in levels[::-1]),
        only_cross_attention=only_cross,
        block_out_channels=channels,
        layers_per_block=int(u.LAYERS_PER_BLOCK),
        attention_head_dim=heads,
        cross_attention_dim=int(cross_attention_dim),
        norm_num_groups=min(32, min(channels)),
    )


def training_scheduler() -> DDPMScheduler:
    """DDPM with SD's training schedule (the same betas as :func:`sd_scheduler`)."""
    return DDPMScheduler.from_config(sd_scheduler().config)


class UnetPretrainModel(nn.Module):
    """Trainable UNet + frozen text tower; ``forward(batch)`` returns ``{"loss_eps": ...}``.

    batch: ``latents`` float [B, C, h, w] (scaled), ``captions`` list of B strings, and with
    ``grounding_weight`` or ``pixel_weight`` > 0 ``grounding``: per sample its
    :func:`~spade.pretrain.grounding.grounding_targets`; the loss dict then also has
    ``loss_ground`` (``grounding_weight`` times the token grounding loss over every
    cross-attention layer) and ``loss_ground_pixel`` (``pixel_weight`` times the pixel loss),
    each where its weight is > 0.
    """

    # what PRETRAIN.COMPILE compiles (the trained network; the frozen text tower and the losses
    # stay eager: the grounding losses' per-caption bookkeeping does not trace well)
    compile_modules = ("unet",)

    def __init__(
        self,
        unet: UNet2DConditionModel,
        clip: ClipParts,
        seed: int = 0,
        grounding_weight: float = 0.0,
        pixel_weight: float = 0.0,
    ):
        super().__init__()
        self.unet = unet
        self.clip = clip  # frozen, not a registered module (not saved in checkpoints)
        self.scheduler = training_scheduler()
        self.seed = int(seed)
        self.grounding_weight = float(grounding_weight)
        self.pixel_weight = float(pixel_weight)
        self._step = 0

    def _apply(self, fn, recurse: bool = True):
        self.clip.model._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, batch: Dict) -> Dict[str, torch.Tensor]:
        latents = batch["latents"].to(self.unet.device, self.unet.dtype)
        context = encode_text_tokens(self.clip, batch["captions"]).to(latents)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._step)
        self._step += 1
        noise = torch.randn(latents.shape, generator=g).to(latents)
        t = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=g
        )
        noisy = self.scheduler.add_noise(latents, noise, t.to(latents.device))
        grounding = self.grounding_weight > 0 or self.pixel_weight > 0
        if grounding and "grounding" not in batch:
            raise KeyError(
                "PRETRAIN.UNET.GROUNDING_WEIGHT or GROUNDING_PIXEL_WEIGHT > 0 needs batches with "
                "'grounding' targets"
            )
        from spade.calibration.attention import capture_cross_attention

        from .grounding import LayerMapStore, grounding_losses

        store = LayerMapStore(latents.shape[-2:]) if grounding else None
        with capture_cross_attention(self.unet, store) if grounding else nullcontext():
            pred = self.unet(noisy, t.to(latents.device), encoder_hidden_states=context).sample
        losses = {"loss_eps": F.mse_loss(pred.float(), noise.float())}
        if grounding:
            token, pixel = grounding_losses(store.maps, batch["grounding"])
            if self.grounding_weight > 0:
                losses["loss_ground"] = self.grounding_weight * token.float()
            if self.pixel_weight > 0:
                losses["loss_ground_pixel"] = self.pixel_weight * pixel.float()
        return losses


def open_cache(path: str, key: str, arrays: Dict[str, tuple], config_key: str) -> List[np.ndarray]:
    """Memory-map a cache's arrays ``{file: (dtype, shape)}``, the last of them its uint8 "done"
    flags; ``<path>.meta`` holds ``key`` (what the cache was made from). When the files or their
    meta are missing, or the meta differs, the arrays are created afresh (nothing done); a file
    that cannot be read or holds another shape or dtype is an error naming it and ``config_key``.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = f"{path}.meta"
    fresh = not (all(os.path.isfile(f) for f in arrays) and os.path.isfile(meta))
    if not fresh:
        with open(meta) as f:
            fresh = f.read() != key
    mode = "w+" if fresh else "r+"
    hint = f"remove {path} and its other {os.path.basename(path)}.* files to rebuild the cache"
    opened = []
    for file, (dtype, shape) in arrays.items():
        try:  # "r+" takes shape and dtype from the file's header: checked below
            a = np.lib.format.open_memmap(file, mode=mode, dtype=dtype, shape=shape)
        except (OSError, ValueError) as e:
            raise ValueError(f"cache file {file} ({config_key}) cannot be read: {e}; {hint}") from e
        if a.dtype != np.dtype(dtype) or a.shape != tuple(shape):
            raise ValueError(
                f"cache file {file} ({config_key}) holds {a.dtype} {a.shape}, this cache needs "
                f"{np.dtype(dtype)} {tuple(shape)}; {hint}"
            )
        opened.append(a)
    if fresh:
        opened[-1][:] = 0
        opened[-1].flush()
        atomic_write_bytes(meta, key.encode())
    return opened


class LatentCache:
    """Scaled VAE posterior means of every corpus image (memory-mapped), computed by :meth:`fill`
    before training or by :meth:`get` on first use.

    Files: ``<path>`` float16 [N, C, h, w], ``<path>.done`` uint8 [N] and ``<path>.meta`` (what
    the latents were made from: the corpus, the VAE's weights and scaling factor). A cache made
    from another corpus or with another VAE is rebuilt.
    """

    def __init__(self, path: str, vae, latent_scale: float, corpus: Corpus):
        import hashlib

        self.vae, self.scale = vae, float(latent_scale)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        size = int(corpus.spec.image_size)
        shape = (len(corpus), int(vae.config.latent_channels), size // factor, size // factor)
        weights = hashlib.sha256()
        for name, tensor in sorted(vae.state_dict().items()):
            weights.update(name.encode())
            weights.update(tensor.detach().float().cpu().numpy().tobytes())
        key = json.dumps(
            {
                "shape": list(shape),
                "scale": self.scale,
                "vae_sha256": weights.hexdigest(),
                "corpus": asdict(corpus.spec),
            },
            sort_keys=True,
        )
        self.latents, self.done = open_cache(
            path,
            key,
            {path: (np.float16, shape), f"{path}.done": (np.uint8, shape[:1])},
            "PRETRAIN.UNET.LATENT_CACHE",
        )

    @torch.no_grad()
    def _encode(self, corpus: Corpus, todo: List[int]) -> None:
        x = to_vae_input(np.stack([corpus.image(i) for i in todo]))
        p = next(self.vae.parameters())
        lat = self.vae.encode(x.to(p)).latent_dist.mean * self.scale
        self.latents[todo] = lat.float().cpu().numpy().astype(np.float16)
        self.done[todo] = 1  # after the latents: a stopped run never marks an unwritten one

    def _missing(self, indices: Iterable[int]) -> List[int]:
        """The images of ``indices`` not yet cached, each once, in order."""
        return [i for i in dict.fromkeys(int(i) for i in indices) if not self.done[i]]

    def get(self, corpus: Corpus, indices: List[int]) -> torch.Tensor:
        """The scaled latents of ``indices`` [B, C, h, w] float32, encoding the missing ones."""
        todo = self._missing(indices)
        if todo:
            self._encode(corpus, todo)
        return torch.from_numpy(np.stack([self.latents[i] for i in indices]).astype(np.float32))

    def fill(self, corpus: Corpus, indices: Iterable[int], batch_size: int = 64) -> int:
        """Encode every image of ``indices`` that the cache lacks, ``batch_size`` at a time, with
        a progress bar (on the main process); returns how many were encoded.

        The pass of its own that ``PRETRAIN.UNET.FILL_LATENT_CACHE`` runs before training: the
        latents are those :meth:`get` would compute (one VAE, fp32, posterior mean), so training
        then reads only the cache. Stopped midway, it continues where it stopped next time.
        """
        from tqdm import tqdm

        if batch_size < 1:
            raise ValueError(f"latent cache fill: batch size must be >= 1, got {batch_size}")
        todo = self._missing(indices)
        bar = tqdm(
            total=len(todo),
            desc=f"VAE latents of the corpus ({self.latents.filename})",
            unit="img",
            disable=not todo or not comm.is_main_process(),
        )
        with bar:
            for k in range(0, len(todo), batch_size):
                chunk = todo[k : k + batch_size]
                self._encode(corpus, chunk)
                bar.update(len(chunk))
        self.latents.flush()
        self.done.flush()
        return len(todo)


class SegmentCache:
    """Every corpus image's segments as one label map, rendered once (memory-mapped).

    The grounding losses need each caption noun's class mask; the corpus stores pixels, not masks,
    and :meth:`Corpus.segments` renders the scene again (about 10 ms an image, some 8 % of a
    grounded step at batch 32). This renders each image once, through :meth:`Corpus.segments`
    (which checks the rendering against the stored image), and keeps its panoptic label map.

    Files: ``<path>`` uint8 [N, size, size] (0 = no segment, k = the image's k-th segment: things
    in drawing order, then stuff), ``<path>.names`` int16 [N, MAX_SEGMENTS] (each segment's class
    index into ``THING_CLASSES + STUFF_CLASSES``, -1 past the last), ``<path>.done`` uint8 [N] and
    ``<path>.meta`` (the corpus it was made from: a cache of another corpus is rebuilt).
    """

    MAX_SEGMENTS = 32

    def __init__(self, path: str, corpus: Corpus):
        from spade.data.synthpsg import STUFF_CLASSES, THING_CLASSES

        self.path = path
        self.classes = list(THING_CLASSES) + list(STUFF_CLASSES)
        self._index = {name: k for k, name in enumerate(self.classes)}
        n, size = len(corpus), int(corpus.spec.image_size)
        key = json.dumps({"corpus": asdict(corpus.spec), "classes": self.classes}, sort_keys=True)
        arrays = {
            path: (np.uint8, (n, size, size)),
            f"{path}.names": (np.int16, (n, self.MAX_SEGMENTS)),
            f"{path}.done": (np.uint8, (n,)),
        }
        self.labels, self.names, self.done = open_cache(
            path, key, arrays, "PRETRAIN.UNET.SEGMENT_CACHE"
        )

    def segments(self, corpus: Corpus, i: int) -> Tuple[np.ndarray, List[str]]:
        """What ``corpus.segments(i)`` returns (bool masks [S, size, size], S class names)."""
        if not self.done[i]:
            masks, names = corpus.segments(i)
            where = f"caption corpus {corpus.root}, image {i}"
            if len(names) > self.MAX_SEGMENTS:
                raise ValueError(
                    f"{where}: {len(names)} segments, the segment cache holds at most "
                    f"{self.MAX_SEGMENTS}"
                )
            if masks.sum(0, dtype=np.int64).max(initial=0) > 1:
                raise ValueError(f"{where}: segments overlap; the segment cache keeps a label map")
            label = np.zeros(masks.shape[1:], np.uint8)
            for k, m in enumerate(masks):
                label[m] = k + 1
            codes = np.full(self.MAX_SEGMENTS, -1, np.int16)
            codes[: len(names)] = [self._index[name] for name in names]
            self.labels[i], self.names[i] = label, codes
            self.done[i] = 1
        codes = self.names[i]
        names = [self.classes[c] for c in codes[codes >= 0]]
        label = np.asarray(self.labels[i])
        masks = label[None] == np.arange(1, len(names) + 1, dtype=np.uint8)[:, None, None]
        return masks, names


def unet_batches(
    corpus: Corpus,
    cache: LatentCache,
    batch_size: int,
    caption_dropout: float,
    seed: int,
    num_images: int = 0,
    encode=None,
    teacher_form_share: float = 0.0,
    pixel_phrase: bool = False,
    segment_cache: Optional[SegmentCache] = None,
) -> Iterator[Dict]:
    """Endless seeded batches of (scaled latents, caption or "" with prob caption_dropout) from
    the first ``num_images`` corpus images (0 = all). With ``encode`` (the text tower's
    tokenizer.encode) each batch also has ``grounding``: per sample the nouns' context positions
    and class masks (:func:`~spade.pretrain.grounding.grounding_targets`).

    ``teacher_form_share`` > 0: that share of the kept captions is drawn in the stage-1 teacher
    form ("square is left of circle", the corpus's ``bare`` kind) instead of the corpus's own mix
    (which has 20 % of them); 0 keeps the batches of earlier runs bit for bit.
    ``pixel_phrase``: each grounding target also carries its noun phrase's positions
    (:func:`~spade.pretrain.grounding.grounding_targets`), which the pixel loss then reads.
    ``segment_cache``: where the grounding targets' masks come from (rendered once per image);
    None renders each image's segments again for every batch. Either gives the same batches.
    """
    if not 0.0 <= teacher_form_share <= 1.0:
        raise ValueError(
            f"PRETRAIN.UNET.TEACHER_FORM_SHARE must lie in [0, 1], got {teacher_form_share}"
        )
    stream = corpus.iter_indices(seed, comm.get_rank(), comm.get_world_size(), limit=num_images)
    step = 0

    def draw_caption(rng, i: int, epoch: int) -> str:
        if rng.random() < caption_dropout:
            return ""
        if teacher_form_share > 0 and rng.random() < teacher_form_share:
            return corpus.caption(i, epoch, kind="bare")
        return corpus.caption(i, epoch)

    while True:
        rng = np.random.default_rng([seed, step, 13])
        picks = [next(stream) for _ in range(batch_size)]
        captions = [draw_caption(rng, i, epoch) for i, epoch in picks]
        batch = {"latents": cache.get(corpus, [i for i, _ in picks]), "captions": captions}
        if encode is not None:
            from .grounding import grounding_targets

            batch["grounding"] = []
            for (i, _), caption in zip(picks, captions):
                if not caption:  # dropped for guidance: nothing to ground
                    batch["grounding"].append([])
                    continue
                if segment_cache is not None:
                    masks, names = segment_cache.segments(corpus, i)
                else:
                    masks, names = corpus.segments(i)
                where = f"caption corpus {corpus.root}, image {i}"
                batch["grounding"].append(
                    grounding_targets(caption, masks, names, encode, where, pixel_phrase)
                )
        yield batch
        step += 1
