"""Classifiers of object-query embeddings: closed-set linear or open-vocabulary (CLIP text space).

Shape shorthand: B batch, Q queries, C query width, K classes, D CLIP embedding dim.
Both return logits [..., K+1] whose last column is the no-object class.
"""

from typing import Optional

from torch import Tensor, nn

__all__ = ["ClosedSetClassifier", "OpenVocabClassifier"]


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
