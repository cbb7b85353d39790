"""Classifiers of object-query embeddings: closed-set linear or open-vocabulary (CLIP text space),
and the optional mask-shape embedding added to a query before it is classified.

Shape shorthand: B batch, Q queries, C query width, K classes, D CLIP embedding dim, h x w mask
resolution, S shape-crop size. Both classifiers return logits [..., K+1] whose last column is the
no-object class.
"""

from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from ..relation.pairs import mask_boxes

__all__ = ["ClosedSetClassifier", "OpenVocabClassifier", "MaskShapeEmbedding"]


class MaskShapeEmbedding(nn.Module):
    """Embeds the shape of each query's own predicted mask, to be added to the query before it is
    classified: the mask probabilities inside the mask's box, resampled to S x S (torchvision's
    ``roi_align``, so the shape is seen at a fixed scale), plus the box's width, height and log
    aspect ratio, through a 2-layer MLP whose last layer starts at zero (the classifier starts
    unchanged).

    The masks are detached: classification reads them, it does not reshape them. An empty mask
    (no probability >= 0.5) is read over the whole map.
    """

    def __init__(self, hidden_dim: int, size: int = 16):
        super().__init__()
        if size < 2:
            raise ValueError(f"MaskShapeEmbedding: size must be >= 2, got {size}")
        self.size = int(size)
        self.mlp = nn.Sequential(
            nn.Linear(self.size * self.size + 3, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def shape_features(self, mask_logits: Tensor) -> Tensor:
        """mask_logits [B, Q, h, w] -> [B, Q, S*S + 3] (crop in [-1, 1], w, h, log(w / h))."""
        B, Q, h, w = mask_logits.shape
        probs = mask_logits.detach().float().sigmoid().flatten(0, 1)[:, None]  # [BQ, 1, h, w]
        boxes = mask_boxes(probs[:, 0] >= 0.5)  # [BQ, 4] in [0, 1]
        empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        whole = torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)
        boxes = torch.where(empty[:, None], whole, boxes)
        scale = torch.tensor([w, h, w, h], device=boxes.device, dtype=boxes.dtype)
        index = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None]
        crops = roi_align(
            probs, torch.cat([index, boxes * scale], dim=1), self.size, 1.0, 2, aligned=True
        )  # [BQ, 1, S, S]
        wh = boxes[:, 2:] - boxes[:, :2]
        aspect = (wh[:, :1] / wh[:, 1:]).log()
        x = torch.cat([crops.flatten(1) * 2 - 1, wh, aspect], dim=1)
        return x.view(B, Q, -1)

    def forward(self, mask_logits: Tensor) -> Tensor:
        """mask_logits [B, Q, h, w] -> shape embedding [B, Q, C]."""
        x = self.shape_features(mask_logits)
        return self.mlp(x.to(self.mlp[0].weight.dtype))


class ClosedSetClassifier(nn.Module):
    """A linear layer over a fixed list of K classes (+1 no-object)."""

    open_vocab = False

    def __init__(self, hidden_dim: int, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ClosedSetClassifier: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.linear = nn.Linear(hidden_dim, num_classes + 1)

    def forward(self, query_features: Tensor, text_embeddings: Optional[Tensor] = None) -> Tensor:
        """query_features [..., C] -> logits [..., K+1]; ``text_embeddings`` must be None."""
        if text_embeddings is not None:
            raise ValueError(
                "ClosedSetClassifier: takes no text embeddings (MASK_HEAD.OPEN_VOCAB False)"
            )
        return self.linear(query_features)


class OpenVocabClassifier(nn.Module):
    """Projects queries into the CLIP text space and scores them by cosine similarity against the
    text embeddings of the current vocabulary (``CosineClassifier``: learned temperature and
    background embedding)."""

    open_vocab = True

    def __init__(self, hidden_dim: int, embed_dim: int, cosine_classifier: nn.Module):
        """
        Args:
            hidden_dim: query width C.
            embed_dim: CLIP embedding dim D.
            cosine_classifier: ``forward(x [..., D], text [K, D]) -> [..., K+1]``.
        """
        super().__init__()
        self.projection = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, embed_dim),
        )
        self.cosine = cosine_classifier

    def forward(self, query_features: Tensor, text_embeddings: Optional[Tensor] = None) -> Tensor:
        """query_features [..., C], text_embeddings [K, D] -> logits [..., K+1]."""
        if text_embeddings is None:
            raise ValueError("OpenVocabClassifier: text embeddings of the vocabulary are required")
        projected = self.projection(query_features)
        return self.cosine(
            projected, text_embeddings.to(device=projected.device, dtype=projected.dtype)
        )
