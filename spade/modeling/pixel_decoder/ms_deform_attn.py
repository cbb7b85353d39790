"""Multi-scale deformable attention in pure PyTorch (bilinear sampling through ``grid_sample``).

Shape shorthand: B batch, Lq queries, L levels, S = sum over levels of h_l * w_l (flattened
value tokens), M heads, Dh = C / M channels per head, Pn sampling points per head per level.

No compiled operator is needed, so the same code runs on CPU and on any GPU.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ms_deform_attn_sample", "MSDeformAttn"]


def ms_deform_attn_sample(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Sample multi-scale values at fractional locations and sum them with attention weights.

    Args:
        value: [B, S, M, Dh] values of all levels, flattened level after level.
        spatial_shapes: long [L, 2] (h_l, w_l) of every level.
        sampling_locations: [B, Lq, M, L, Pn, 2] (x, y) in [0, 1] of each level's image extent;
            pixel centres sit at (i + 0.5) / w_l (``align_corners=False``); outside samples read 0.
        attention_weights: [B, Lq, M, L, Pn] weights (softmax over L * Pn per head).

    Returns:
        [B, Lq, M * Dh] attended features.
    """
    bsz, _, nheads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_levels = value.split(sizes, dim=1)
    grids = 2.0 * sampling_locations - 1.0  # grid_sample works in [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        # [B, h*w, M, Dh] -> [B*M, Dh, h, w]
        v = value_levels[level].flatten(2).transpose(1, 2).reshape(bsz * nheads, head_dim, h, w)
        # [B, Lq, M, Pn, 2] -> [B*M, Lq, Pn, 2]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [B*M, Dh, Lq, Pn]
    # [B, Lq, M, L, Pn] -> [B*M, 1, Lq, L*Pn]
    weights = attention_weights.transpose(1, 2).reshape(
        bsz * nheads, 1, num_queries, num_levels * num_points
    )
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [B*M, Dh, Lq]
    return out.view(bsz, nheads * head_dim, num_queries).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (each query reads Pn learned points per head and level)."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        """
        Args:
            d_model: channels C of queries and values; divisible by ``n_heads``.
            n_levels: number of feature levels L.
            n_heads: attention heads M.
            n_points: sampling points Pn per head per level.
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model {d_model} not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = (
            d_model,
            n_levels,
            n_heads,
            n_points,
        )
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on rays around the reference point (one direction per head), k steps
        out."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * torch.pi / self.n_heads)
        rays = torch.stack([angles.cos(), angles.sin()], -1)
        rays = rays / rays.abs().max(-1, keepdim=True)[0]
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = rays.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1) * steps
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: [B, Lq, C] queries (with position embedding added).
            reference_points: [B, Lq, L, 2] (x, y) in [0, 1] per level.
            input_flatten: [B, S, C] values of all levels, flattened level after level.
            spatial_shapes: long [L, 2] (h_l, w_l).
            padding_mask: optional bool [B, S], True at padded positions (their values are zeroed).

        Returns:
            [B, Lq, C].
        """
        bsz, num_queries, _ = query.shape
        num_values = input_flatten.shape[1]
        if int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum()) != num_values:
            raise ValueError(
                f"MSDeformAttn: spatial_shapes {spatial_shapes.tolist()} do not cover the "
                f"{num_values} value tokens"
            )
        if reference_points.shape[-1] != 2:
            raise ValueError("MSDeformAttn: reference_points must end in (x, y)")
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(bsz, num_values, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(
            bsz, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            bsz, num_queries, self.n_heads, self.n_levels * self.n_points
        )
        weights = weights.softmax(-1).view(
            bsz, num_queries, self.n_heads, self.n_levels, self.n_points
        )
        # offsets are in pixels of each level: normalise by (w_l, h_l)
        normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(query.dtype)
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / normalizer[None, None, None, :, None, :]
        )
        out = ms_deform_attn_sample(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
