"""Registry of SPADE relation heads."""

from detectron2.utils.registry import Registry
from torch import nn

__all__ = ["SPADE_RELATION_HEAD_REGISTRY", "build_relation_head"]

SPADE_RELATION_HEAD_REGISTRY = Registry("SPADE_RELATION_HEAD")
SPADE_RELATION_HEAD_REGISTRY.__doc__ = """
Relation heads of SPADE, selected by ``MODEL.SPADE.RELATION.NAME`` and built as ``obj(cfg)``.

Shape shorthand: B batch, Q object queries, C query width, K classes, P predicates, D CLIP dim,
M pairs of an image.

The object is an ``nn.Module`` called as::

    head(
        query_features [B, Q, C],    # final decoder query embeddings
        mask_logits [B, Q, h, w],    # final mask logits at mask-feature resolution
        class_probs [B, Q, K + 1],   # softmax class scores (last column = no object)
        features,                    # dict of backbone / pixel-decoder maps [B, C_f, h_f, w_f]
        clip_features=None,          # [B, D, h', w'] CLIP dense features, or None
        predicate_text=None,         # [P, D] L2-normalised predicate text embeddings, or None
        targets=None,                # training: list of {"gt_relations": long [R, 3]}
        matches=None,                # training: list of (query_idx long [N'], gt_idx long [N'])
        pair_mask=None,              # inference, optional: bool [B, Q, Q] selectable pairs
    )

and returns, in training, a dict of weighted losses ("loss_rel", optionally "loss_rqc"), and at
inference a list (one per image) of ``{"pairs": long [M, 2] query indices, "pair_scores": [M],
"predicate_scores": [M, P]}`` that :func:`spade.modeling.relation.relation_inference` turns into
ranked triplets over panoptic segment ids.
"""


def build_relation_head(cfg) -> nn.Module:
    """Build the relation head named by ``cfg.MODEL.SPADE.RELATION.NAME``."""
    return SPADE_RELATION_HEAD_REGISTRY.get(cfg.MODEL.SPADE.RELATION.NAME)(cfg)
