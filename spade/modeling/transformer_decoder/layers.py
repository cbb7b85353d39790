"""Layers of the masked-attention transformer decoder (batch-first tensors).

Shape shorthand: B batch, Q queries, S memory tokens (h * w of one scale), C channels, M heads.
"""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CrossAttentionLayer",
    "SelfAttentionLayer",
    "FFNLayer",
    "MLP",
    "attention_mask_from_logits",
]


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


def attention_mask_from_logits(mask_logits: Tensor, size, nheads: int) -> Tensor:
    """Masked-attention mask of each query: it may only look where its predicted mask is >= 0.5.

    Args:
        mask_logits: [B, Q, h, w] mask logits of the previous prediction.
        size: (h', w') of the memory scale attended next.
        nheads: attention heads M.

    Returns:
        bool [B * M, Q, h' * w'], True where attention is blocked. A query whose mask is empty at
        this scale is allowed everywhere (it would otherwise attend to nothing).
    """
    resized = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
    blocked = resized.sigmoid().flatten(2) < 0.5  # [B, Q, S]
    blocked[blocked.all(-1)] = False
    return blocked.detach().repeat_interleave(nheads, dim=0)


class CrossAttentionLayer(nn.Module):
    """Queries attend to one scale of the pixel features (optionally masked); residual + norm."""

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        attn_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        """tgt [B, Q, C], memory [B, S, C], attn_mask bool [B*M, Q, S] (True = blocked),
        pos [B, S, C], query_pos [B, Q, C]; returns [B, Q, C]."""
        q = self.norm(tgt) if self.normalize_before else tgt
        out = self.attn(
            _with_pos(q, query_pos),
            _with_pos(memory, pos),
            memory,
            attn_mask=attn_mask,
            need_weights=False,
        )[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class SelfAttentionLayer(nn.Module):
    """Self-attention among the queries; residual + LayerNorm."""

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, tgt: Tensor, query_pos: Optional[Tensor] = None) -> Tensor:
        """tgt, query_pos: [B, Q, C]; returns [B, Q, C]."""
        q = self.norm(tgt) if self.normalize_before else tgt
        qk = _with_pos(q, query_pos)
        tgt = tgt + self.dropout(self.attn(qk, qk, q, need_weights=False)[0])
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """Two-layer feed-forward network; residual + LayerNorm."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        dropout: float = 0.0,
        normalize_before: bool = False,
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, tgt: Tensor) -> Tensor:
        """tgt: [B, Q, C]; returns [B, Q, C]."""
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x
