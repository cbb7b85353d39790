"""Masked-attention transformer decoder with learnable object queries.

Shape shorthand: B batch, Q object queries, C = hidden_dim, Cm = mask_dim, L = 3 scales visited
round-robin, h x w mask-feature resolution.
"""

from typing import Dict, List

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from ..pixel_decoder.position_encoding import PositionEmbeddingSine
from .layers import (
    MLP,
    CrossAttentionLayer,
    FFNLayer,
    SelfAttentionLayer,
    attention_mask_from_logits,
)

__all__ = ["MaskedAttentionDecoder"]


class MaskedAttentionDecoder(nn.Module):
    """Each layer: masked cross-attention to one scale (each query sees only inside its mask from
    the previous prediction), self-attention, FFN; scales visited round-robin, coarsest first.

    The decoder is class-agnostic: it predicts query embeddings and masks at every layer, and the
    classifier (closed-set or open-vocabulary) is applied by the meta-architecture.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        mask_dim: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        enforce_input_project: bool,
        num_scales: int = 3,
    ):
        """
        Args:
            in_channels: channels of the pixel decoder's multi-scale maps.
            mask_dim: channels Cm of the mask-feature map.
            hidden_dim: query width C.
            num_queries: learnable object queries Q.
            nheads, dim_feedforward, pre_norm: transformer layer shape.
            dec_layers: decoder layers (round-robin over ``num_scales`` scales).
            enforce_input_project: project the maps to C even when in_channels == C.
        """
        super().__init__()
        if dec_layers < 1:
            raise ValueError(f"MaskedAttentionDecoder: dec_layers must be >= 1, got {dec_layers}")
        self.num_heads, self.num_layers, self.num_scales = nheads, dec_layers, num_scales
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2)
        self.cross_attention = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, normalize_before=pre_norm)
            for _ in range(dec_layers)
        )
        self.self_attention = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, normalize_before=pre_norm)
            for _ in range(dec_layers)
        )
        self.ffn = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, normalize_before=pre_norm)
            for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query content
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query position
        self.level_embed = nn.Embedding(num_scales, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_scales):
            if in_channels != hidden_dim or enforce_input_project:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_dim: int):
        m = cfg.MODEL.SPADE.MASK_HEAD
        return {
            "in_channels": in_channels,
            "mask_dim": mask_dim,
            "hidden_dim": m.HIDDEN_DIM,
            "num_queries": m.NUM_OBJECT_QUERIES,
            "nheads": m.NHEADS,
            "dim_feedforward": m.DIM_FEEDFORWARD,
            "dec_layers": m.DEC_LAYERS,
            "pre_norm": m.PRE_NORM,
            "enforce_input_project": m.ENFORCE_INPUT_PROJ,
        }

    def predict(self, queries: Tensor, mask_features: Tensor):
        """Normalised query embeddings [B, Q, C] and their mask logits [B, Q, h, w]."""
        embeddings = self.decoder_norm(queries)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(embeddings), mask_features)
        return embeddings, masks

    def forward(
        self, multi_scale_features: List[Tensor], mask_features: Tensor
    ) -> Dict[str, List[Tensor]]:
        """
        Args:
            multi_scale_features: ``num_scales`` maps [B, C_in, h_l, w_l], coarsest first.
            mask_features: [B, Cm, h, w].

        Returns:
            {"query_features": dec_layers + 1 tensors [B, Q, C],
             "pred_masks": dec_layers + 1 tensors [B, Q, h, w]}: the prediction of the initial
            queries, then one per layer; the last entry is the final output.
        """
        if len(multi_scale_features) != self.num_scales:
            raise ValueError(
                f"MaskedAttentionDecoder: expected {self.num_scales} scales, got "
                f"{len(multi_scale_features)}"
            )
        memories, positions, sizes = [], [], []
        for i, feat in enumerate(multi_scale_features):
            sizes.append(feat.shape[-2:])
            positions.append(self.pe_layer(feat).flatten(2).transpose(1, 2))
            proj = self.input_proj[i](feat).flatten(2).transpose(1, 2)
            memories.append(proj + self.level_embed.weight[i])
        bsz = mask_features.shape[0]
        query_pos = self.query_embed.weight[None].expand(bsz, -1, -1)
        output = self.query_feat.weight[None].expand(bsz, -1, -1)
        embeddings, masks = self.predict(output, mask_features)
        all_embeddings, all_masks = [embeddings], [masks]
        for i in range(self.num_layers):
            level = i % self.num_scales
            attn_mask = attention_mask_from_logits(masks, sizes[level], self.num_heads)
            output = self.cross_attention[i](
                output,
                memories[level],
                attn_mask=attn_mask,
                pos=positions[level],
                query_pos=query_pos,
            )
            output = self.self_attention[i](output, query_pos=query_pos)
            output = self.ffn[i](output)
            embeddings, masks = self.predict(output, mask_features)
            all_embeddings.append(embeddings)
            all_masks.append(masks)
        return {"query_features": all_embeddings, "pred_masks": all_masks}
