"""Teacher cross-attention maps A_i and their on-disk cache.

Shape shorthand: T triplets of one image (<= CALIBRATION.MAX_TRIPLETS_PER_IMAGE), L text context
length, D cross-attention width, C x h x w the VAE latent, R = CALIBRATION.MAP_RESOLUTION.

For one image and its ground-truth triplets the :class:`TeacherMapGenerator` builds one prompt
per triplet from CALIBRATION.PROMPT_TEMPLATE, with every name written as the text classifiers
write it (:func:`spade.modeling.open_vocab.prompt_name`: "floor-other-merged" -> "floor"),
encodes the image with the VAE to ``x_0``, inverts
``x_0`` to noise with the frozen teacher (the UNet with LoRA disabled) conditioned on each prompt
(CALIBRATION.INVERSION; CALIBRATION.NOISE "random" skips the inversion and starts from seeded
random noise), samples back (CALIBRATION.SAMPLER) while recording the cross-attention maps of the
chosen steps, and returns the normalised role maps ``[T, 3, R, R]`` (subject, predicate, object).

:class:`TeacherMapCache` stores one safetensors file per image under CALIBRATION.CACHE_DIR,
keyed by a SHA-256 of everything that changes the maps: the model fingerprint (weights of the
teacher UNet, VAE and text encoder), the generator settings, the prompts and the image bytes. A file
whose key differs (stale), that cannot be parsed (corrupt) or whose tensors are malformed is
recomputed. Writes are atomic, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from spade.modeling.open_vocab import prompt_name
from spade.utils.io import atomic_save_safetensors

from . import inversion as inv
from .attention import (
    AttentionStore,
    capture_cross_attention,
    normalize_maps,
    role_maps,
    role_token_spans,
)

__all__ = [
    "TeacherMapGenerator",
    "TeacherMapCache",
    "module_fingerprint",
    "load_calibration_image",
    "triplet_names",
]

logger = logging.getLogger(__name__)

Triplet = Tuple[str, str, str]


def load_calibration_image(file_name: str, size: int) -> Tuple[torch.Tensor, bytes]:
    """Read an RGB image, resize it to ``size x size``.

    Returns:
        image float [3, size, size] in [0, 1], and the file's bytes (for cache keys).
    """
    try:
        with open(file_name, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read calibration image {file_name}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), data


def triplet_names(
    record: dict, class_names: Sequence[str], predicate_names: Sequence[str], max_triplets: int
) -> List[Triplet]:
    """The first ``max_triplets`` ground-truth triplets of a dataset dict, as names."""
    segs, out = record["segments_info"], []
    for rel in record.get("relations", [])[:max_triplets]:
        s, o, p = (int(v) for v in rel)
        if not (0 <= s < len(segs) and 0 <= o < len(segs) and 0 <= p < len(predicate_names)):
            raise ValueError(
                f"image {record.get('image_id')} ({record.get('file_name')}): relation {rel} "
                f"out of range ({len(segs)} segments, {len(predicate_names)} predicates)"
            )
        names = [class_names[segs[i]["category_id"]] for i in (s, o)]
        out.append((names[0], predicate_names[p], names[1]))
    return out


def module_fingerprint(*modules: torch.nn.Module, skip: str = "lora_") -> str:
    """SHA-256 over parameter / buffer names, shapes and bytes (names containing ``skip`` are
    left out, so the trainable LoRA does not change the teacher's identity)."""
    h = hashlib.sha256()
    for m_i, module in enumerate(modules):
        for name, t in sorted(module.state_dict().items()):
            if skip and skip in name:
                continue
            h.update(f"{m_i}:{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TeacherMapGenerator:
    """Inversion -> teacher sampling -> role maps for one image's triplets.

    Args (keyword-only):
        unet: UNet2DConditionModel (the teacher when run inside ``teacher_mode``).
        vae: AutoencoderKL; ``latent_scale`` scales its latents.
        scheduler: diffusers scheduler giving the noise schedule.
        encode_text: list of prompts -> [N, L, D] token states (frozen text encoder).
        encode_ids: text -> BPE ids without start/end tokens (for token spans).
        context_length: L.
        teacher_mode: () -> context manager under which ``unet`` is the frozen teacher
            (LoRA disabled).
        display_name: dataset name -> the words put in the prompt (default: the text
            classifiers' :func:`~spade.modeling.open_vocab.prompt_name`).
        num_steps, inversion, sampler, noise, guidance_scale, capture_steps, resolution,
        normalization, template: the CALIBRATION settings of the same names.
    """

    def __init__(
        self,
        *,
        unet,
        vae,
        latent_scale: float,
        scheduler,
        encode_text: Callable[[List[str]], torch.Tensor],
        encode_ids: Callable[[str], List[int]],
        context_length: int,
        num_steps: int,
        inversion: str = "belm",
        sampler: str = "belm",
        noise: str = "inversion",
        guidance_scale: float = 1.0,
        capture_steps: Sequence[int] = (),
        resolution: int = 16,
        normalization: str = "max",
        template: str = "{subject} is {predicate} {object}",
        teacher_mode: Callable[[], ContextManager] = contextlib.nullcontext,
        display_name: Callable[[str], str] = prompt_name,
    ):
        if noise not in ("inversion", "random"):
            raise ValueError(f"CALIBRATION.NOISE must be 'inversion' or 'random', got {noise!r}")
        bad = [s for s in capture_steps if not 1 <= int(s) <= num_steps]
        if bad:
            raise ValueError(f"CALIBRATION.CAPTURE_TIMESTEPS {bad} outside 1..{num_steps}")
        self.unet, self.vae, self.latent_scale = unet, vae, float(latent_scale)
        self.encode_text, self.encode_ids = encode_text, encode_ids
        self.context_length = int(context_length)
        self.grid = inv.make_grid(scheduler, num_steps, dtype=torch.float64)
        self.inversion, self.sampler, self.noise = inversion, sampler, noise
        self.guidance_scale = float(guidance_scale)
        self.capture_steps = frozenset(int(s) for s in capture_steps)
        self.resolution, self.normalization, self.template = resolution, normalization, template
        self.teacher_mode = teacher_mode
        self.display_name = display_name
        self.settings = {  # everything besides the model, prompts and image that changes the maps
            "num_steps": num_steps,
            "inversion": inversion,
            "sampler": sampler,
            "noise": noise,
            "guidance_scale": self.guidance_scale,
            "capture_steps": sorted(self.capture_steps),
            "resolution": resolution,
            "normalization": normalization,
            "latent_scale": float(latent_scale),
            "scheduler": {k: str(v) for k, v in sorted(dict(scheduler.config).items())},
        }

    def role_names(self, triplet: Triplet) -> Dict[str, str]:
        """{"subject", "predicate", "object"} -> the display name put in the prompt."""
        s, p, o = (self.display_name(str(n)) for n in triplet)
        return {"subject": s, "predicate": p, "object": o}

    def prompts(self, triplets: Sequence[Triplet]) -> List[str]:
        """One prompt per triplet of dataset names, e.g. ("floor-other-merged", "on", "wall")
        -> "floor is on wall"."""
        return [self.template.format(**self.role_names(t)) for t in triplets]

    def spans(self, triplets: Sequence[Triplet], offset: int = 1) -> List[Dict[str, List[int]]]:
        """Role token positions of each prompt (``offset`` = position of the first word)."""
        return [
            role_token_spans(
                self.encode_ids,
                self.template,
                self.role_names(t),
                offset=offset,
                max_length=self.context_length + offset - 1,
            )
            for t in triplets
        ]

    @torch.no_grad()
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [0, 1] -> scaled VAE latents (posterior mean) [B, C, h, w]."""
        p = next(self.vae.parameters())
        latent = self.vae.encode((images * 2 - 1).to(p)).latent_dist.mean
        return latent * self.latent_scale

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, triplets: Sequence[Triplet], seed: int = 0):
        """Teacher maps of one image.

        Args:
            image: float [3, S, S] in [0, 1].
            triplets: T (subject, predicate, object) names; T may be 0.
            seed: seed of the start noise when CALIBRATION.NOISE is "random".

        Returns:
            float32 [T, 3, R, R] role maps, normalised per map.
        """
        r = self.resolution
        if len(triplets) == 0:
            return torch.zeros(0, 3, r, r)
        spans = self.spans(triplets)
        context = self.encode_text(self.prompts(triplets))
        uncond = None
        if self.guidance_scale != 1.0:
            uncond = self.encode_text([""]).expand(len(triplets), -1, -1)
        x0 = self.encode_latent(image[None]).double().expand(len(triplets), -1, -1, -1)
        store = AttentionStore(r, x0.shape[-2:])

        def on_step(step: int, conditional: bool) -> None:
            store.active = conditional and (not self.capture_steps or step in self.capture_steps)

        eps_fn = inv.unet_eps_fn(self.unet, context, uncond, self.guidance_scale, on_step)
        with self.teacher_mode():
            if self.noise == "random":
                g = torch.Generator().manual_seed(int(seed))
                z = torch.randn(x0.shape[1:], generator=g, dtype=torch.float64)
                start = inv.InversionResult(noise=z.expand_as(x0).to(x0.device).clone())
            else:  # inversion runs on the UNet's own (fused) processors: nothing is captured
                start = inv.invert(self.inversion, eps_fn, x0, self.grid)
            with capture_cross_attention(self.unet, store):
                inv.sample(self.sampler, eps_fn, start, self.grid)
        maps = role_maps(store.mean().float(), spans)
        return normalize_maps(maps, self.normalization).cpu()


class TeacherMapCache:
    """One safetensors file of teacher maps per image, validated by a content key.

    File ``<cache_dir>/<image_id>.safetensors``: tensor ``maps`` float32 [T, 3, R, R]; metadata
    ``key`` (hex SHA-256), ``image_id``, ``prompts`` (JSON list).

    Args:
        cache_dir: directory of the files (created when missing).
        generator: the :class:`TeacherMapGenerator`.
        fingerprint: model identity (e.g. :func:`module_fingerprint` of UNet, VAE, text encoder).
        image_size: CALIBRATION.IMAGE_SIZE.
    """

    def __init__(
        self, cache_dir: str, generator: TeacherMapGenerator, fingerprint: str, image_size: int
    ):
        self.cache_dir = cache_dir
        self.generator = generator
        self.image_size = int(image_size)
        base = {
            "model": fingerprint,
            "settings": generator.settings,
            "template": generator.template,
            "image_size": self.image_size,
        }
        self._base = json.dumps(base, sort_keys=True)

    def path(self, image_id: str) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(image_id))
        return os.path.join(self.cache_dir, f"{safe}.safetensors")

    def key(self, image_bytes: bytes, prompts: Sequence[str]) -> str:
        h = hashlib.sha256(self._base.encode())
        h.update(json.dumps(list(prompts)).encode())
        h.update(hashlib.sha256(image_bytes).digest())
        return h.hexdigest()

    def load(self, image_id: str, key: str, num_triplets: int) -> Optional[torch.Tensor]:
        """The cached maps [T, 3, R, R], or None when missing, stale or corrupt (logged)."""
        from safetensors import safe_open

        path = self.path(image_id)
        if not os.path.exists(path):
            return None
        r = self.generator.resolution
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key:
                    logger.info("teacher cache %s is stale (key changed); recomputing", path)
                    return None
                maps = f.get_tensor("maps")
        except Exception as e:  # any parse failure means a corrupt file
            logger.warning("teacher cache %s is corrupt (%s); recomputing", path, e)
            return None
        if tuple(maps.shape) != (num_triplets, 3, r, r) or not bool(torch.isfinite(maps).all()):
            logger.warning(
                "teacher cache %s has malformed maps %s; recomputing", path, tuple(maps.shape)
            )
            return None
        return maps

    def lookup(self, record: dict, triplets: Sequence[Triplet]):
        """Read one dataset dict's image and its cached maps (None when not valid).

        Returns:
            (image float [3, S, S] in [0, 1], maps [T, 3, R, R] or None, cache key).
        """
        image, data = load_calibration_image(record["file_name"], self.image_size)
        key = self.key(data, self.generator.prompts(triplets))
        return image, self.load(str(record["image_id"]), key, len(triplets)), key

    def get(self, record: dict, triplets: Sequence[Triplet]) -> torch.Tensor:
        """Maps of one dataset dict (loaded, or computed and written)."""
        image, maps, key = self.lookup(record, triplets)
        image_id = str(record["image_id"])
        prompts = self.generator.prompts(triplets)
        if maps is None:
            seed = int(key[:8], 16)
            maps = self.generator(image, triplets, seed=seed)
            meta = {"key": key, "image_id": image_id, "prompts": json.dumps(prompts)}
            atomic_save_safetensors({"maps": maps}, self.path(image_id), metadata=meta)
        return maps

    def precompute(
        self, items: Sequence[Tuple[dict, Sequence[Triplet]]], rank: int = 0, world_size: int = 1
    ) -> int:
        """Fill the cache for this rank's shard ``items[rank::world_size]`` (tqdm on rank 0).

        Returns the number of images of the shard."""
        from tqdm import tqdm

        shard = list(items)[rank::world_size]
        for record, triplets in tqdm(shard, desc="teacher maps", disable=rank != 0):
            self.get(record, triplets)
        return len(shard)
