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

Student map source (CALIBRATION.STUDENT_MAPS)
--------------------------------------------
``"prompt_tokens"`` (above) reads A_i' from the prompt tokens that follow the implicit tokens; but
stage 2 conditions the UNet on the K implicit tokens *alone*, so what those maps calibrate is not
exactly what stage 2 uses. ``"implicit_tokens"`` reads A_i' from the conditioning stage 2 uses:
one UNet pass per image with the context ``[K, D]`` of the implicit tokens only, which gives one
map per implicit slot ``M [B, K, R, R]``; each role of a triplet then reads those slot maps the way
a cross-attention query would, with the role's words (the mean of the prompt's token states e_r
over the role's span) as the query:

    A_i'(r) = sum_k softmax_k(<e_r, t_k> / sqrt(D)) * M_k,

t_k the implicit tokens of the image. The text only chooses among the slots; every map comes
from a UNet pass conditioned exactly as in stage 2.

Only the LoRA factors (or, for the full fine-tuning ablation, the whole UNet) and the MLP adapter
receive gradients; the VAE, CLIP and (with LoRA) the UNet's base weights are frozen.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
from detectron2.config import configurable
from torch import nn

from .attention import ROLES, AttentionStore, capture_cross_attention, normalize_maps, role_maps
from .teacher import TeacherMapGenerator

__all__ = ["CalibrationModel", "calibration_loss", "STUDENT_MAP_SOURCES"]

STUDENT_MAP_SOURCES = ("prompt_tokens", "implicit_tokens")  # CALIBRATION.STUDENT_MAPS


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
        student_map_source: str = "prompt_tokens",
    ):
        """
        Args:
            unet: UNet2DConditionModel carrying LoRA (or wholly trainable for full fine-tuning).
            vae: frozen AutoencoderKL.
            implicit_text: ImplicitTextEncoder (images -> [B, K, D]).
            clip_model: the frozen open_clip model (registered so ``.to`` moves it).
            teacher: the generator whose text encoder, prompts, spans, resolution and map
                normalisation the student shares.
            clip_preprocess: (images [B, 3, H, W] in [0, 1]) -> CLIP-normalised images.
            student_timestep: UNet timestep of the student pass.
            lambda_cal: lambda of L_cal.
            student_map_source: CALIBRATION.STUDENT_MAPS, one of :data:`STUDENT_MAP_SOURCES`
                (module docstring).
        """
        super().__init__()
        self.unet, self.vae, self.implicit_text = unet, vae, implicit_text
        self.clip_model = clip_model
        self.teacher = teacher
        self.clip_preprocess = clip_preprocess
        self.student_timestep = int(student_timestep)
        self.lambda_cal = float(lambda_cal)
        if student_map_source not in STUDENT_MAP_SOURCES:
            raise ValueError(
                f"CALIBRATION.STUDENT_MAPS = {student_map_source!r} is not one of "
                f"{list(STUDENT_MAP_SOURCES)}"
            )
        self.student_map_source = student_map_source

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
        if self.student_map_source == "implicit_tokens":
            maps = self._implicit_slot_maps(images, flat, index)
        else:
            maps = self._prompt_token_maps(images, flat, index)
        return normalize_maps(maps, self.teacher.normalization)

    def _unet_maps(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Per-context-token maps [N, L', R, R] of one student UNet pass (with grad)."""
        store = AttentionStore(self.teacher.resolution, latents.shape[-2:])
        dtype = next(self.unet.parameters()).dtype
        t = torch.full((latents.shape[0],), self.student_timestep, device=latents.device)
        with capture_cross_attention(self.unet, store):
            self.unet(latents.to(dtype), t.long(), encoder_hidden_states=context.to(dtype))
        return store.mean().float()

    def _prompt_token_maps(self, images, flat, index) -> torch.Tensor:
        """Role-token maps in the context [K implicit + L prompt tokens]: [T, 3, R, R]."""
        latents = self.teacher.encode_latent(images)[index]  # [T, C, h, w]
        implicit = self.implicit_text(self.clip_preprocess(images))[index]  # [T, K, D]
        prompt = self.teacher.encode_text(self.teacher.prompts(flat)).to(implicit)  # [T, L, D]
        context = torch.cat([implicit, prompt], dim=1)
        spans = self.teacher.spans(flat, offset=1 + implicit.shape[1])
        return role_maps(self._unet_maps(latents, context), spans)

    def _implicit_slot_maps(self, images, flat, index) -> torch.Tensor:
        """Role read-out of the implicit-slot maps of a K-token-only pass ([T, 3, R, R])."""
        implicit = self.implicit_text(self.clip_preprocess(images))  # [B, K, D]
        slot_maps = self._unet_maps(self.teacher.encode_latent(images), implicit)  # [B, K, R, R]
        prompt = self.teacher.encode_text(self.teacher.prompts(flat)).to(implicit)  # [T, L, D]
        spans = self.teacher.spans(flat)
        roles = torch.stack(
            [torch.stack([prompt[i, s[r]].mean(0) for r in ROLES]) for i, s in enumerate(spans)]
        )  # [T, 3, D]
        tokens = implicit[index].float()  # [T, K, D]
        weights = torch.einsum("trd,tkd->trk", roles.float(), tokens) / math.sqrt(tokens.shape[-1])
        return torch.einsum("trk,tkhw->trhw", weights.softmax(dim=-1), slot_maps[index])

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
