"""Deformable-attention transformer encoder over multi-scale feature maps.

Shape shorthand: B batch, L levels, C channels, S = sum over levels of h_l * w_l.
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ms_deform_attn import MSDeformAttn

__all__ = ["DeformableEncoderLayer", "DeformableEncoder", "flatten_levels", "reference_points"]


def flatten_levels(maps: List[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Flatten per-level maps [B, C, h_l, w_l] into tokens.

    Returns:
        tokens [B, S, C], spatial_shapes long [L, 2] (h_l, w_l), level_start_index long [L].
    """
    shapes = torch.as_tensor([m.shape[-2:] for m in maps], dtype=torch.long, device=maps[0].device)
    tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return tokens, shapes, starts


def reference_points(spatial_shapes: Tensor, batch_size: int, dtype: torch.dtype) -> Tensor:
    """Pixel centres of every token, normalised to [0, 1]: [B, S, L, 2] (x, y), equal on all L."""
    points = []
    for h, w in spatial_shapes.tolist():
        ys = (torch.arange(h, device=spatial_shapes.device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=spatial_shapes.device, dtype=dtype) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.flatten(), grid_y.flatten()], -1))
    ref = torch.cat(points, 0)  # [S, 2]
    num_levels = spatial_shapes.shape[0]
    return ref[None, :, None, :].expand(batch_size, -1, num_levels, -1)


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention over all levels, then a feed-forward network."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        dropout: float,
        n_levels: int,
        n_heads: int,
        n_points: int,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, ref: Tensor, spatial_shapes: Tensor) -> Tensor:
        """src, pos: [B, S, C]; ref: [B, S, L, 2]; returns [B, S, C]."""
        attended = self.self_attn(src + pos, ref, src, spatial_shapes)
        src = self.norm1(src + self.dropout(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer` with a learned per-level embedding."""

    def __init__(
        self,
        *,
        d_model: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        n_levels: int,
        n_heads: int,
        n_points: int,
    ):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        nn.init.normal_(self.level_embed)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, dim_feedforward, dropout, n_levels, n_heads, n_points)
            for _ in range(num_layers)
        )

    def forward(self, maps: List[Tensor], pos_maps: List[Tensor]) -> List[Tensor]:
        """maps, pos_maps: L tensors [B, C, h_l, w_l]; returns the encoded maps, same shapes."""
        if len(maps) != self.level_embed.shape[0]:
            raise ValueError(
                f"DeformableEncoder: built for {self.level_embed.shape[0]} levels, got {len(maps)}"
            )
        src, shapes, _ = flatten_levels(maps)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[i] for i, p in enumerate(pos_maps)],
            dim=1,
        )
        ref = reference_points(shapes, src.shape[0], src.dtype)
        for layer in self.layers:
            src = layer(src, pos, ref, shapes)
        sizes = (shapes[:, 0] * shapes[:, 1]).tolist()
        return [
            t.transpose(1, 2).reshape(t.shape[0], -1, h, w)
            for t, (h, w) in zip(src.split(sizes, dim=1), shapes.tolist())
        ]
