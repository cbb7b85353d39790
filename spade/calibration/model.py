"""The calibration student and the loss L_cal.

Shape shorthand: B images, T_b triplets of image b, T = sum_b T_b, K implicit tokens, L text
context length, D cross-attention width, R = CALIBRATION.MAP_RESOLUTION.

Student role maps A_i' (design)
-------------------------------
The student is the UNet with LoRA on its cross-attention (attn2) projections, fed by the implicit
text encoder (frozen CLIP image tower -> trainable MLP adapter -> K tokens). At inference it sees
only those K tokens, which carry no words, so it has no "subject" token to read a map from. During
calibration its context is therefore the K implicit tokens *concatenated* with the prompt's L
token states, ``[K + L, D]``: one UNet pass on the real (clean) image latent at timestep
MODEL.SPADE.DIFFUSION.TIMESTEP, no inversion. The softmax of every attn2 layer runs over all
K + L tokens, so the implicit tokens compete for attention mass with the words; the maps of the
prompt's subject / predicate / object tokens (positions shifted by K) are A_i'. The teacher's
maps A_i come from the LoRA-free UNet sampling back from the inverted latent with the prompt alone
(:mod:`spade.calibration.teacher`). Both are averaged over heads and layers, resized to R x R,
averaged over each role's tokens and normalised per map (CALIBRATION.MAP_NORMALIZATION), then

    L_cal = lambda * mean |A_i - A_i'|        (mean over triplets, roles and R x R pixels).

Only the LoRA factors (or, for the full fine-tuning ablation, the attn2 projections) and the MLP
adapter receive gradients; the VAE, CLIP and the UNet's base weights are frozen.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from detectron2.config import configurable
from torch import nn

from .attention import AttentionStore, capture_cross_attention, normalize_maps, role_maps
from .teacher import TeacherMapGenerator

__all__ = ["CalibrationModel", "calibration_loss"]


def calibration_loss(
    teacher_maps: torch.Tensor, student_maps: torch.Tensor, lam: float = 1.0
) -> torch.Tensor:
    """``L_cal = lam * mean |A - A'|`` over [T, 3, R, R] maps; 0 (with grad) when T = 0."""
    if teacher_maps.shape != student_maps.shape:
        raise ValueError(
            f"teacher maps {tuple(teacher_maps.shape)} and student maps "
            f"{tuple(student_maps.shape)} differ in shape"
        )
    if teacher_maps.numel() == 0:
        return student_maps.sum() * 0.0
    return lam * (teacher_maps.to(student_maps) - student_maps).abs().mean()


class CalibrationModel(nn.Module):
    """Student UNet + implicit text encoder, trained against cached teacher maps.

    Input of :meth:`forward`: a list (one per image) of dicts with
    ``"image"`` float [3, S, S] in [0, 1], ``"triplets"`` list of T_b (subject, predicate, object)
    names and ``"teacher_maps"`` float [T_b, 3, R, R]. Output: ``{"loss_cal": scalar}``.
    """

    @configurable
    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        implicit_text: nn.Module,
        clip_model: nn.Module,
        teacher: TeacherMapGenerator,
        clip_preprocess,
        student_timestep: int = 0,
        lambda_cal: float = 1.0,
    ):
        """
        Args:
            unet: UNet2DConditionModel carrying LoRA (or unfrozen attn2 for full fine-tuning).
            vae: frozen AutoencoderKL.
            implicit_text: ImplicitTextEncoder (images -> [B, K, D]).
            clip_model: the frozen open_clip model (registered so ``.to`` moves it).
            teacher: the generator whose text encoder, prompts, spans, resolution and map
                normalisation the student shares.
            clip_preprocess: (images [B, 3, H, W] in [0, 1]) -> CLIP-normalised images.
            student_timestep: UNet timestep of the student pass.
            lambda_cal: lambda of L_cal.
        """
        super().__init__()
        self.unet, self.vae, self.implicit_text = unet, vae, implicit_text
        self.clip_model = clip_model
        self.teacher = teacher
        self.clip_preprocess = clip_preprocess
        self.student_timestep = int(student_timestep)
        self.lambda_cal = float(lambda_cal)

    @classmethod
    def from_config(cls, cfg):
        from .builder import build_calibration_parts  # the builder imports this module

        return build_calibration_parts(cfg)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def student_maps(
        self, images: torch.Tensor, triplets: Sequence[Sequence[tuple]]
    ) -> torch.Tensor:
        """Student role maps A_i'.

        Args:
            images: float [B, 3, S, S] in [0, 1].
            triplets: per image, T_b (subject, predicate, object) names.

        Returns:
            [T, 3, R, R] normalised role maps (image-major order), differentiable w.r.t. LoRA
            and adapter.
        """
        counts = [len(t) for t in triplets]
        flat = [t for per_image in triplets for t in per_image]
        r = self.teacher.resolution
        if not flat:
            return images.new_zeros(0, 3, r, r)
        index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        index = index.to(images.device)
        latents = self.teacher.encode_latent(images)[index]  # [T, C, h, w]
        implicit = self.implicit_text(self.clip_preprocess(images))[index]  # [T, K, D]
        prompt = self.teacher.encode_text(self.teacher.prompts(flat)).to(implicit)  # [T, L, D]
        context = torch.cat([implicit, prompt], dim=1)
        spans = self.teacher.spans(flat, offset=1 + implicit.shape[1])
        store = AttentionStore(r, latents.shape[-2:])
        dtype = next(self.unet.parameters()).dtype
        t = torch.full((len(flat),), self.student_timestep, dtype=torch.long, device=images.device)
        with capture_cross_attention(self.unet, store):
            self.unet(latents.to(dtype), t, encoder_hidden_states=context.to(dtype))
        maps = role_maps(store.mean().float(), spans)
        return normalize_maps(maps, self.teacher.normalization)

    def forward(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """L_cal of a batch: ``{"loss_cal": scalar}``."""
        for d in batched_inputs:
            if len(d["triplets"]) != d["teacher_maps"].shape[0]:
                raise ValueError(
                    f"image {d.get('image_id')}: {len(d['triplets'])} triplets but teacher maps "
                    f"of shape {tuple(d['teacher_maps'].shape)}"
                )
        images = torch.stack([d["image"] for d in batched_inputs]).to(self.device)
        student = self.student_maps(images, [d["triplets"] for d in batched_inputs])
        r = self.teacher.resolution
        teacher = torch.cat([d["teacher_maps"].reshape(-1, 3, r, r) for d in batched_inputs]).to(
            student
        )
        loss = calibration_loss(teacher, student, self.lambda_cal)
        if student.numel() == 0:  # keep every trainable parameter in the graph (DDP)
            loss = loss + sum(p.sum() * 0.0 for p in self.trainable_parameters())
        return {"loss_cal": loss}
