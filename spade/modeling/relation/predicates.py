"""Predicate classification of relation pairs: open-vocabulary cosine classifier, closed-set
fallback, and the CLIP joint-mask branch fused by geometric mean at inference.

Shape shorthand: m pairs, E pair-embedding width, P predicates (column P = no relation),
D text / CLIP dim, Q object queries, h x w mask resolution, h' x w' CLIP feature map.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..open_vocab import CosineClassifier, geometric_fusion, joint_mask_pool

__all__ = ["PredicateClassifier"]


class PredicateClassifier(nn.Module):
    """Pair embeddings -> predicate logits over P + 1 classes.

    With predicate text embeddings [P, D]: ``CosineClassifier(Linear(x), text)``, whose last column
    is a learned no-relation embedding, so the vocabulary can be replaced at inference. Without
    text: a closed-set ``Linear(E, num_predicates + 1)``. At inference, :meth:`fuse_clip` fuses
    P_diff with the CLIP branch (CLIP features pooled under the union of subject and object masks,
    compared with the same text): P = P_diff^alpha * P_clip^(1 - alpha), renormalised to
    1 - p(no relation).
    """

    def __init__(
        self,
        hidden_dim: int,
        *,
        text_dim: int,
        num_predicates: int,
        logit_scale_init: float,
        clip_temperature: float,
        fusion_alpha: float,
        fusion_beta: float,
        text_whitening: float = 0.0,
    ):
        """
        Args:
            hidden_dim: E.
            text_dim: D (0 = no open-vocabulary classifier).
            num_predicates: closed-set classes (0 = no closed-set classifier).
            logit_scale_init: log of the cosine classifier's initial temperature.
            clip_temperature: temperature of the CLIP branch's cosine logits.
            fusion_alpha, fusion_beta: geometric-fusion weights (beta: novel predicates; the head
                is not told which predicates are novel, so alpha applies to all).
            text_whitening: shrinkage of the cosine classifier's TextWhitening (0 = none); the
                CLIP branch compares with the raw text.
        """
        super().__init__()
        if text_dim <= 0 and num_predicates <= 0:
            raise ValueError(
                "relation head without a predicate classifier: enable "
                "MODEL.SPADE.MASK_HEAD.OPEN_VOCAB (text embeddings) or set "
                "MODEL.SPADE.RELATION.NUM_PREDICATES"
            )
        self.text_dim = text_dim
        self.num_predicates = num_predicates
        self.clip_temperature = clip_temperature
        self.fusion_alpha = fusion_alpha
        self.fusion_beta = fusion_beta
        self.text_proj = nn.Linear(hidden_dim, text_dim) if text_dim > 0 else None
        self.cosine = (
            CosineClassifier(text_dim, logit_scale_init, text_whitening) if text_dim > 0 else None
        )
        self.closed_set = nn.Linear(hidden_dim, num_predicates + 1) if num_predicates > 0 else None

    def vocabulary_size(self, predicate_text: Optional[Tensor]) -> int:
        """P: rows of ``predicate_text``, else the closed-set size."""
        return len(predicate_text) if predicate_text is not None else self.num_predicates

    def check_text(self, predicate_text: Optional[Tensor]) -> None:
        """Raise a clear error when ``predicate_text`` does not fit this classifier."""
        if predicate_text is None and self.closed_set is None:
            raise ValueError(
                "relation head: predicate_text is None and there is no closed-set classifier "
                "(RELATION.NUM_PREDICATES is 0 and the training dataset names no predicate_classes)"
            )
        if predicate_text is None:
            return
        if self.cosine is None:
            raise ValueError(
                "relation head: predicate_text given but the head was built closed-set "
                "(MODEL.SPADE.MASK_HEAD.OPEN_VOCAB is False)"
            )
        if predicate_text.dim() != 2 or predicate_text.shape[1] != self.text_dim:
            raise ValueError(
                f"predicate_text must be [P, D={self.text_dim}], got {tuple(predicate_text.shape)}"
            )

    def forward(self, pair_embedding: Tensor, predicate_text: Optional[Tensor]) -> Tensor:
        """pair_embedding [m, E], predicate_text [P, D] or None -> logits [m, P + 1]."""
        if predicate_text is not None:
            text = predicate_text.to(pair_embedding.dtype)
            return self.cosine(self.text_proj(pair_embedding), text)
        return self.closed_set(pair_embedding)

    @torch.no_grad()
    def clip_probabilities(
        self,
        clip_features: Tensor,
        mask_logits: Tensor,
        pairs: Tensor,
        predicate_text: Tensor,
        chunk_size: int,
    ) -> Tensor:
        """CLIP branch of one image -> P_clip [M, P].

        clip_features [D, h', w'], mask_logits [Q, h, w], pairs [M, 2]; chunk_size pairs at a time.
        """
        masks = mask_logits[None].float().sigmoid()  # resized to h' x w' by joint_mask_pool
        text = F.normalize(predicate_text.float(), dim=-1)
        out = []
        for start in range(0, len(pairs), chunk_size):
            chunk = pairs[start : start + chunk_size]
            pooled = joint_mask_pool(clip_features[None].float(), masks, chunk[None])[0]  # [m, D]
            logits = self.clip_temperature * F.normalize(pooled, dim=-1) @ text.T
            out.append(logits.softmax(dim=-1))
        return torch.cat(out, dim=0) if out else text.new_zeros(0, len(text))

    def fuse_clip(self, probs: Tensor, p_clip: Tensor) -> Tensor:
        """probs [M, P + 1] (softmax of the logits), p_clip [M, P] -> fused [M, P + 1]."""
        return geometric_fusion(probs, p_clip, self.fusion_alpha, self.fusion_beta, None)
