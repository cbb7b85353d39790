"""Sine position embedding of a 2-D feature map (shared by the pixel and transformer decoders)."""

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine embedding of normalised (y, x) pixel-centre coordinates.

    ``forward(x [B, C, h, w]) -> [B, 2 * num_pos_feats, h, w]``; the first half encodes y, the
    second half x. Coordinates are the pixel centres scaled to (0, ``scale``).
    """

    def __init__(
        self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
    ):
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats {num_pos_feats} must be even")
        self.num_pos_feats, self.temperature, self.scale = num_pos_feats, temperature, scale

    def forward(self, x: Tensor) -> Tensor:
        bsz, _, h, w = x.shape
        y_embed = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5) / h * self.scale
        x_embed = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5) / w * self.scale
        dim_t = torch.arange(self.num_pos_feats, device=x.device, dtype=torch.float32)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_y = y_embed[:, None] / dim_t  # [h, F]
        pos_x = x_embed[:, None] / dim_t  # [w, F]
        pos_y = torch.stack([pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()], -1).flatten(1)
        pos_x = torch.stack([pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()], -1).flatten(1)
        pos = torch.cat(
            [pos_y[:, None, :].expand(h, w, -1), pos_x[None, :, :].expand(h, w, -1)], dim=-1
        )  # [h, w, 2F]
        return pos.permute(2, 0, 1)[None].expand(bsz, -1, -1, -1).to(x.dtype)
