"""Spatial-aware relational graph transformer: RGT_g (long range) and RGT_l (local GCN).

Shape shorthand: B batch, Q object queries, C channels (``RELATION.HIDDEN_DIM``), G the bool
spatial-semantic graph [B, Q, Q] of :mod:`spade.modeling.relation.graph` (diagonal False).

RGT_g (one :class:`RGTGlobalLayer`)::

    q <- q + Attn(q | P+) + Attn(q | P-)     P+ = neighbours (G), P- = non-neighbours (~G, no self)
    q <- LN(q);  q <- LN(q + MLP(q))

RGT_l (one :class:`GraphConvolution` inside :class:`RGTLocal`)::

    q_hat = A_hat q W_l,   A_hat = D^-1/2 (G + I) D^-1/2,   D = row sums of G + I
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MaskedMultiheadAttention",
    "RGTGlobalLayer",
    "normalized_adjacency",
    "GraphConvolution",
    "RGTLocal",
]


class MaskedMultiheadAttention(nn.Module):
    """Multi-head self-attention whose keys are restricted by a boolean mask per query.

    A query row with no allowed key attends to nothing and outputs exactly zero (not NaN, not the
    output-projection bias), so an isolated node gets no contribution from this branch.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"RELATION.HIDDEN_DIM={dim} is not divisible by NHEADS={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """
        Args:
            x: [B, Q, C] node features.
            allowed: bool [B, Q, Q]; allowed[b, i, j] lets query i attend to key j.
        Returns:
            [B, Q, C]; rows with no allowed key are zero.
        """
        B, Q, C = x.shape
        if allowed.shape != (B, Q, Q):
            raise ValueError(
                f"attention mask must be [B, Q, Q]={B, Q, Q}, got {tuple(allowed.shape)}"
            )
        q, k, v = self.qkv(x).reshape(B, Q, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # [B, h, Q, Q]
        has_key = allowed.any(dim=-1)  # [B, Q]
        # rows with no key: fill with 0 so softmax stays finite, then zero the row afterwards
        fill = (~allowed) & has_key[:, :, None]
        logits = logits.masked_fill(fill[:, None], float("-inf"))
        weights = logits.softmax(dim=-1) * allowed[:, None].to(logits.dtype)
        out = (weights @ v).transpose(1, 2).reshape(B, Q, C)
        return self.out_proj(out) * has_key[:, :, None].to(out.dtype)


class RGTGlobalLayer(nn.Module):
    """One RGT_g layer: neighbour and non-neighbour attention fused by addition, then an MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dim_feedforward: int,
        *,
        use_neighbour_attention: bool = True,
        use_non_neighbour_attention: bool = True,
    ):
        super().__init__()
        self.neighbour_attention = (
            MaskedMultiheadAttention(dim, num_heads) if use_neighbour_attention else None
        )
        self.non_neighbour_attention = (
            MaskedMultiheadAttention(dim, num_heads) if use_non_neighbour_attention else None
        )
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim_feedforward), nn.GELU(), nn.Linear(dim_feedforward, dim)
        )
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, q: Tensor, graph: Tensor) -> Tensor:
        """q [B, Q, C], graph bool [B, Q, Q] -> [B, Q, C]."""
        Q = q.shape[1]
        update = q
        if self.neighbour_attention is not None:
            update = update + self.neighbour_attention(q, graph)
        if self.non_neighbour_attention is not None:
            eye = torch.eye(Q, dtype=torch.bool, device=q.device)
            update = update + self.non_neighbour_attention(q, ~graph & ~eye)
        q = self.norm1(update)
        return self.norm2(q + self.mlp(q))


def normalized_adjacency(graph: Tensor) -> Tensor:
    """A_hat = D^-1/2 (G + I) D^-1/2 for a bool or float graph [B, Q, Q] -> float [B, Q, Q]."""
    Q = graph.shape[-1]
    a = graph.float() + torch.eye(Q, device=graph.device)
    a = a.clamp(max=1.0)  # a graph that already holds self loops keeps weight 1 on the diagonal
    inv_sqrt_deg = a.sum(dim=-1).rsqrt()  # >= 1 thanks to the self loop
    return inv_sqrt_deg[..., :, None] * a * inv_sqrt_deg[..., None, :]


class GraphConvolution(nn.Module):
    """One GCN layer ``A_hat q W_l`` (no bias): [B, Q, C_in] -> [B, Q, C_out]."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, q: Tensor, adjacency: Tensor) -> Tensor:
        """q [B, Q, C_in], adjacency (already normalised) [B, Q, Q] -> [B, Q, C_out]."""
        return adjacency @ (q @ self.weight)


class RGTLocal(nn.Module):
    """RGT_l: stacked residual GCN layers, q <- LN(q + GELU(A_hat q W_l))."""

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"RELATION.GCN_LAYERS must be >= 1 when RGT_l is on, got {num_layers}")
        self.layers = nn.ModuleList(GraphConvolution(dim, dim) for _ in range(num_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_layers))

    def forward(self, q: Tensor, graph: Tensor, adjacency: Optional[Tensor] = None) -> Tensor:
        """q [B, Q, C], graph bool [B, Q, Q] -> [B, Q, C]."""
        if adjacency is None:
            adjacency = normalized_adjacency(graph).to(q.dtype)
        for gcn, norm in zip(self.layers, self.norms):
            q = norm(q + F.gelu(gcn(q, adjacency)))
        return q
