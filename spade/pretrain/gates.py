"""Gates of the miniature foundation models, measured on synthpsg_val (recorded in manifests).

``measure(cfg, folder)`` runs the gates of ``PRETRAIN.TASK`` on the exported model in ``folder``:
* vae: reconstruction PSNR on synthpsg_val images (target >= 30 dB);
* clip: zero-shot segment classification, colour+shape on crops, held-out retrieval, and the
  left/right and above/below probes (spade.pretrain.gates_clip);
* unet: the pointing game of the project's teacher maps (spade.pretrain.gates_unet) and the
  generation sanity grid.
The validation images are SynthPSG's (``PRETRAIN.GATES.DATA_ROOT``, generated when missing);
since every SynthPSG image is a pure function of (seed, index), each val image's scene facts
(thing colours) are re-rendered rather than stored.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch
from PIL import Image

from spade.data.synthpsg import (
    STUFF_CLASSES,
    THING_CLASSES,
    ensure_synthpsg,
    render_scene,
)

__all__ = ["ValImage", "val_images", "measure", "vae_gates", "GATE_TARGETS"]

logger = logging.getLogger(__name__)

GATE_TARGETS = {
    "vae/psnr_db": 30.0,
    # things the way the SynthPSG stage 2 names them (context crops, OPEN_VOCAB.CLIP_CROP_SCALE);
    # stuff the way it names stuff (dense features pooled under the mask)
    "clip/context_crops_things_top1": 0.90,
    "clip/segments_stuff_top1": 0.90,
    "clip/colour_shape_top1": 0.80,
    "clip/retrieval_i2t_r1": 0.50,
    "unet/pointing_subject_things": 0.50,
    "unet/mass_ratio_subject_things": 3.0,
}
CLASS_NAMES = THING_CLASSES + STUFF_CLASSES


@dataclass
class ValImage:
    """One synthpsg_val image with its segments (masks in segments_info order)."""

    image_id: str
    rgb: np.ndarray  # uint8 [H, W, 3]
    masks: np.ndarray  # bool [S, H, W]
    categories: List[int]  # index into CLASS_NAMES per segment
    colours: List[str]  # palette colour per thing segment (things come first)
    relations: List[List[int]]  # [subject, object, predicate] segment indices
    boxes: List[List[int]]  # xyxy per segment


def val_images(cfg, limit: int = 0) -> List[ValImage]:
    """The synthpsg_val images of the gate dataset (first ``limit`` when > 0)."""
    g = cfg.PRETRAIN.GATES
    root = ensure_synthpsg(
        str(g.DATA_ROOT), num_images=int(g.DATA_NUM_IMAGES), seed=int(g.DATA_SEED)
    )
    import json

    with open(os.path.join(root, "psg.json")) as f:
        psg = json.load(f)
    wanted = set(psg["val_image_ids"])
    out = []
    for rec in psg["data"]:
        if rec["image_id"] not in wanted:
            continue
        index = int(rec["image_id"])
        scene = render_scene(int(g.DATA_SEED), index, size=int(rec["width"]))
        rgb = np.asarray(Image.open(os.path.join(root, rec["file_name"])).convert("RGB"))
        pan = np.asarray(Image.open(os.path.join(root, rec["pan_seg_file_name"])).convert("RGB"))
        ids = pan[..., 0].astype(np.int64) + 256 * pan[..., 1] + 65536 * pan[..., 2]
        segs = rec["segments_info"]
        out.append(
            ValImage(
                image_id=rec["image_id"],
                rgb=rgb,
                masks=np.stack([ids == s["id"] for s in segs]),
                categories=[int(s["category_id"]) for s in segs],
                colours=list(scene.thing_colours),
                relations=[list(map(int, r)) for r in rec["relations"]],
                boxes=[list(map(int, a["bbox"])) for a in rec["annotations"]],
            )
        )
        if limit and len(out) >= limit:
            break
    return out


def measure(cfg, folder: str) -> Dict:
    task = str(cfg.PRETRAIN.TASK)
    limit = int(cfg.PRETRAIN.GATES.NUM_IMAGES)
    if task == "vae":
        return vae_gates(folder, val_images(cfg, limit))
    if task == "clip":
        from .gates_clip import clip_gates

        return clip_gates(cfg, folder, val_images(cfg, limit))
    if task == "unet":
        from .gates_unet import unet_gates

        return unet_gates(cfg, os.path.dirname(os.path.normpath(folder)), val_images(cfg, limit))
    raise ValueError(f"PRETRAIN.TASK={task!r} has no gates")


@torch.no_grad()
def vae_gates(folder: str, images: List[ValImage]) -> Dict:
    """PSNR (dB) of VAE reconstructions (posterior mean -> decoder) of the val images."""
    from diffusers import AutoencoderKL

    from .vae import psnr, to_vae_input

    vae = AutoencoderKL.from_pretrained(folder).eval()
    values = []
    for k in range(0, len(images), 16):
        x = to_vae_input(np.stack([im.rgb for im in images[k : k + 16]]))
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        values.append(psnr((x + 1) / 2, ((recon + 1) / 2).clamp(0, 1)))
    values = torch.cat(values)
    return {
        "vae/psnr_db": round(float(values.mean()), 2),
        "vae/psnr_db_min": round(float(values.min()), 2),
        "vae/images": len(images),
        "vae/latent_scale": float(vae.config.scaling_factor),
        "targets": {"vae/psnr_db": GATE_TARGETS["vae/psnr_db"]},
    }
