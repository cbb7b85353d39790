"""The implicit text encoder: frozen CLIP image tower -> trainable MLP adapter -> K UNet tokens.

The student UNet has no text at inference; its ``encoder_hidden_states`` come from the image
itself. Shapes: B batch, D CLIP joint embedding dim, K tokens (``IMPLICIT_TEXT.NUM_TOKENS``),
C the UNet's cross_attention_dim.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ImplicitTextAdapter", "ImplicitTextEncoder", "build_implicit_text_encoder"]


class ImplicitTextAdapter(nn.Module):
    """MLP adapter: CLIP image embedding [B, D] -> K tokens [B, K, C].

    Linear(D, hidden) -> GELU -> Linear(hidden, K * C) -> LayerNorm(C) per token, so the tokens
    have the statistics of the text encoder's final-layer-norm outputs they replace.
    """

    def __init__(self, in_dim: int, hidden_dim: int, num_tokens: int, token_dim: int):
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("hidden_dim", hidden_dim),
            ("num_tokens", num_tokens),
            ("token_dim", token_dim),
        ):
            if int(value) <= 0:
                raise ValueError(f"ImplicitTextAdapter: {name} must be positive, got {value}")
        self.in_dim = int(in_dim)
        self.hidden_dim = int(hidden_dim)
        self.num_tokens = int(num_tokens)
        self.token_dim = int(token_dim)
        self.mlp = nn.Sequential(
            nn.Linear(self.in_dim, self.hidden_dim),
            nn.GELU(),
            nn.Linear(self.hidden_dim, self.num_tokens * self.token_dim),
        )
        self.norm = nn.LayerNorm(self.token_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """embedding [B, D] -> tokens [B, K, C]."""
        if embedding.dim() != 2 or embedding.shape[1] != self.in_dim:
            raise ValueError(
                f"ImplicitTextAdapter expects [B, {self.in_dim}] embeddings, "
                f"got {tuple(embedding.shape)}"
            )
        tokens = self.mlp(embedding).view(-1, self.num_tokens, self.token_dim)
        return self.norm(tokens)


class ImplicitTextEncoder(nn.Module):
    """Frozen CLIP image tower followed by a trainable :class:`ImplicitTextAdapter`.

    The CLIP tower is shared with the rest of the model, so it is held as a plain attribute, not a
    registered submodule: it is not in this module's ``state_dict`` or ``parameters()`` (only the
    adapter is), it stays in eval mode, and device / dtype moves (``.to``) are forwarded to it.

    Args:
        clip_visual: open_clip image tower (``model.visual``), [B, 3, S, S] -> [B, D].
        adapter: the MLP adapter.
        image_size: (height, width) the tower expects; default ``clip_visual.image_size``.
    """

    def __init__(
        self,
        clip_visual: nn.Module,
        adapter: ImplicitTextAdapter,
        image_size: Optional[Tuple[int, int]] = None,
    ):
        super().__init__()
        object.__setattr__(self, "clip_visual", clip_visual)  # shared, frozen: not registered
        self.adapter = adapter
        size = image_size if image_size is not None else getattr(clip_visual, "image_size")
        self.image_size = (int(size), int(size)) if isinstance(size, int) else tuple(size)

    @property
    def num_tokens(self) -> int:
        return self.adapter.num_tokens

    def _apply(self, fn, recurse: bool = True):
        # forward .to() / .cuda() / .half() to the shared (unregistered) CLIP tower
        self.clip_visual._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images [B, 3, H, W] (any size; resized here) -> tokens [B, K, C].

        The CLIP tower runs without grad; gradients reach only the adapter.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"ImplicitTextEncoder expects [B, 3, H, W] images, got {tuple(images.shape)}"
            )
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(
                images, size=self.image_size, mode="bilinear", align_corners=False
            )
        weight = next(self.clip_visual.parameters())
        with torch.no_grad():
            embedding = self.clip_visual(images.to(dtype=weight.dtype))
        adapter_dtype = self.adapter.mlp[0].weight.dtype
        return self.adapter(embedding.to(dtype=adapter_dtype))


def build_implicit_text_encoder(
    cfg, clip_parts, cross_attention_dim: int, seed: int = 0
) -> ImplicitTextEncoder:
    """Build the encoder from ``cfg.MODEL.SPADE.IMPLICIT_TEXT`` over ``clip_parts.model.visual``.

    Args:
        cfg: the config (``MODEL.SPADE.IMPLICIT_TEXT.NUM_TOKENS`` / ``HIDDEN_DIM``).
        clip_parts: :class:`~spade.modeling.backbone.loading.ClipParts` (its image tower is shared).
        cross_attention_dim: C, the UNet's ``config.cross_attention_dim``.
        seed: seed of the adapter's random init (the global RNG is left untouched).
    """
    it = cfg.MODEL.SPADE.IMPLICIT_TEXT
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = ImplicitTextAdapter(
            in_dim=clip_parts.embed_dim,
            hidden_dim=int(it.HIDDEN_DIM),
            num_tokens=int(it.NUM_TOKENS),
            token_dim=int(cross_attention_dim),
        )
    return ImplicitTextEncoder(clip_parts.model.visual, adapter, clip_parts.image_size)
