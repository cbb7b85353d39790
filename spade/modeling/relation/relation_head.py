"""SPADE's relation heads: the spatial-aware RGT head and the plain pair-MLP baseline.

Shape shorthand: B batch, Q object queries, C query width, E = RELATION.HIDDEN_DIM, K classes,
P predicates, D text / CLIP dim, M pairs of an image, h x w mask resolution, C_f channels of the
map pooled under joint masks.

Forward (one call, :mod:`spade.modeling.relation.build` documents the signature):

1. q = Linear(query_features)                                     [B, Q, E]
2. G = spatial-semantic graph from masks + query features          [B, Q, Q]  (graph.py)
3. q <- RGT_g layers (neighbour / non-neighbour attention) then RGT_l (GCN over G)  (rgt.py)
4. pair selection: s[i, j] = t * cos(W_s q_i, W_o q_j) (L_rqc trains it); pairs ranked by
   s[i, j] + log o_i + log o_j (o = 1 - p(no object)), top-M per image, self pairs excluded;
   in training the GT pairs not selected are added
5. pair embedding = MLP([q_s, q_o, geometry(s, o), pool(features under mask_s OR mask_o)])  [M, E]
6. predicates: cosine classifier against predicate_text (+ learned no-relation embedding), or a
   closed-set linear layer over NUM_PREDICATES + 1 when predicate_text is None; at inference the
   CLIP branch (joint-mask pooled clip_features vs predicate_text) is fused by geometric mean.
Scoring runs in chunks of PAIR_CHUNK pairs so memory stays bounded for large Q and M.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from torch import Tensor, nn

from ..open_vocab import joint_mask_pool
from .build import SPADE_RELATION_HEAD_REGISTRY
from .graph import build_spatial_semantic_graph
from .pairs import GEOMETRY_DIM, mask_boxes, pair_geometry, select_pairs
from .predicates import PredicateClassifier
from .relation_criterion import (
    RelationCriterion,
    add_target_pairs,
    matched_pairs,
    predicate_targets,
    relation_targets,
)
from .rgt import RGTGlobalLayer, RGTLocal, normalized_adjacency

__all__ = ["RGTRelationHead", "PairMLPRelationHead", "relation_text_dim"]


def relation_text_dim(cfg) -> int:
    """D of predicate text embeddings: RELATION.TEXT_DIM, else the configured CLIP's embed dim."""
    if cfg.MODEL.SPADE.RELATION.TEXT_DIM > 0:
        return int(cfg.MODEL.SPADE.RELATION.TEXT_DIM)
    if cfg.MODEL.SPADE.CLIP.MODEL_NAME == "TINY":
        return int(cfg.MODEL.SPADE.CLIP.TINY.EMBED_DIM)
    from spade.modeling.backbone.loading import clip_model_config  # json only; no weights

    model_cfg = clip_model_config(cfg)
    if model_cfg is None:
        raise ValueError(
            f"cannot infer the CLIP embed dim of MODEL.SPADE.CLIP.MODEL_NAME="
            f"{cfg.MODEL.SPADE.CLIP.MODEL_NAME!r}; set MODEL.SPADE.RELATION.TEXT_DIM"
        )
    return int(model_cfg["embed_dim"])


@SPADE_RELATION_HEAD_REGISTRY.register()
class RGTRelationHead(nn.Module):
    """Spatial-aware relational graph transformer head with open-vocabulary predicates."""

    @configurable
    def __init__(
        self,
        *,
        query_dim: int,
        pool_dim: int,
        hidden_dim: int,
        num_heads: int,
        dim_feedforward: int,
        rgt_layers: int,
        gcn_layers: int,
        graph_mode: str,
        eta: float,
        adjacency_distance: int,
        graph_resolution: int,
        knn: int,
        num_pairs: int,
        pair_chunk: int,
        use_neighbour_attention: bool,
        use_non_neighbour_attention: bool,
        use_local_gcn: bool,
        use_clip_branch: bool,
        baseline_pair_mlp: bool,
        pool_feature: str,
        text_dim: int,
        num_predicates: int,
        logit_scale_init: float,
        fusion_alpha: float,
        fusion_beta: float,
        clip_temperature: float,
        criterion: RelationCriterion,
        text_whitening: float = 0.0,
        train_matched_pairs: bool = False,
    ):
        """
        Args:
            query_dim: C, width of the decoder's query embeddings.
            pool_dim: C_f, channels of ``features[pool_feature]``.
            hidden_dim: E, width of relation features.
            num_heads, dim_feedforward, rgt_layers: RGT_g attention heads, MLP width, layers.
            gcn_layers: RGT_l GCN layers.
            graph_mode, eta, adjacency_distance, graph_resolution, knn: graph G (graph.py).
            num_pairs: M, candidate pairs per image; pair_chunk: pairs scored per chunk.
            use_neighbour_attention, use_non_neighbour_attention, use_local_gcn, use_clip_branch:
                ablation switches; baseline_pair_mlp: skip G, RGT_g and RGT_l altogether.
            pool_feature: key of the map pooled under the joint masks.
            text_dim: D of predicate text embeddings (0 = no open-vocabulary classifier).
            num_predicates: size of the closed-set linear classifier (0 = none).
            logit_scale_init: log of the initial cosine temperature (pair selection, predicates).
            fusion_alpha, fusion_beta: geometric-fusion weights (OPEN_VOCAB.FUSION_ALPHA / _BETA).
            clip_temperature: temperature of the CLIP predicate branch's cosine logits.
            criterion: L_rel + L_rqc.
            text_whitening: shrinkage of the predicate text whitening (0 = none; the model fits
                it on the training predicates, ``predicates.cosine.whitening.fit``).
            train_matched_pairs: L_rel also on every ordered pair of matched queries.
        """
        super().__init__()
        if pair_chunk <= 0 or num_pairs <= 0:
            raise ValueError(
                f"RELATION.NUM_PAIRS ({num_pairs}) and PAIR_CHUNK ({pair_chunk}) must be > 0"
            )
        self.graph_args = dict(
            mode=graph_mode,
            eta=eta,
            adjacency_distance=adjacency_distance,
            resolution=graph_resolution,
            knn=knn,
        )
        self.num_pairs = num_pairs
        self.train_matched_pairs = bool(train_matched_pairs)
        self.pair_chunk = pair_chunk
        self.use_clip_branch = use_clip_branch
        self.baseline_pair_mlp = baseline_pair_mlp
        self.pool_feature = pool_feature
        self.criterion = criterion

        self.input_proj = nn.Linear(query_dim, hidden_dim)
        reasoning = not baseline_pair_mlp
        attention = use_neighbour_attention or use_non_neighbour_attention
        self.global_layers = nn.ModuleList(
            RGTGlobalLayer(
                hidden_dim,
                num_heads,
                dim_feedforward,
                use_neighbour_attention=use_neighbour_attention,
                use_non_neighbour_attention=use_non_neighbour_attention,
            )
            for _ in range(rgt_layers if reasoning and attention else 0)
        )
        self.local_gcn = RGTLocal(hidden_dim, gcn_layers) if reasoning and use_local_gcn else None

        # relation query construction
        self.subject_proj = nn.Linear(hidden_dim, hidden_dim)
        self.object_proj = nn.Linear(hidden_dim, hidden_dim)
        self.selection_logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.geometry_embed = nn.Sequential(nn.Linear(GEOMETRY_DIM, hidden_dim), nn.ReLU())
        self.pool_proj = nn.Linear(pool_dim, hidden_dim)
        self.pair_mlp = nn.Sequential(
            nn.Linear(4 * hidden_dim, dim_feedforward),
            nn.GELU(),
            nn.Linear(dim_feedforward, hidden_dim),
            nn.LayerNorm(hidden_dim),
        )
        self.predicates = PredicateClassifier(
            hidden_dim,
            text_dim=text_dim,
            num_predicates=num_predicates,
            logit_scale_init=logit_scale_init,
            clip_temperature=clip_temperature,
            fusion_alpha=fusion_alpha,
            fusion_beta=fusion_beta,
            text_whitening=text_whitening,
        )

    @classmethod
    def from_config(cls, cfg) -> dict:
        r = cfg.MODEL.SPADE.RELATION
        pool_dims = {"mask_features": cfg.MODEL.SPADE.PIXEL_DECODER.MASK_DIM}
        open_vocab = cfg.MODEL.SPADE.MASK_HEAD.OPEN_VOCAB
        num_predicates = r.NUM_PREDICATES
        if num_predicates == 0 and not open_vocab and cfg.DATASETS.TRAIN:
            num_predicates = len(
                MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("predicate_classes", [])
            )
        return {
            "query_dim": cfg.MODEL.SPADE.MASK_HEAD.HIDDEN_DIM,
            "pool_dim": pool_dims.get(r.POOL_FEATURE, cfg.MODEL.SPADE.DIFFUSION.OUT_CHANNELS),
            "hidden_dim": r.HIDDEN_DIM,
            "num_heads": r.NHEADS,
            "dim_feedforward": r.DIM_FEEDFORWARD,
            "rgt_layers": r.RGT_LAYERS,
            "gcn_layers": r.GCN_LAYERS,
            "graph_mode": r.GRAPH_MODE,
            "eta": r.ETA,
            "adjacency_distance": r.ADJACENCY_DISTANCE,
            "graph_resolution": r.GRAPH_RESOLUTION,
            "knn": r.KNN,
            "num_pairs": r.NUM_PAIRS,
            "pair_chunk": r.PAIR_CHUNK,
            "use_neighbour_attention": r.USE_NEIGHBOUR_ATTENTION,
            "use_non_neighbour_attention": r.USE_NON_NEIGHBOUR_ATTENTION,
            "use_local_gcn": r.USE_LOCAL_GCN,
            "use_clip_branch": r.USE_CLIP_BRANCH,
            "baseline_pair_mlp": r.BASELINE_PAIR_MLP,
            "pool_feature": r.POOL_FEATURE,
            "text_dim": relation_text_dim(cfg) if open_vocab else 0,
            "num_predicates": num_predicates,
            "logit_scale_init": cfg.MODEL.SPADE.OPEN_VOCAB.LOGIT_SCALE_INIT,
            "fusion_alpha": _fusion(r.FUSION_ALPHA, cfg.MODEL.SPADE.OPEN_VOCAB.FUSION_ALPHA),
            "fusion_beta": _fusion(r.FUSION_BETA, cfg.MODEL.SPADE.OPEN_VOCAB.FUSION_BETA),
            "clip_temperature": r.CLIP_TEMPERATURE,
            "text_whitening": r.TEXT_WHITENING,
            "train_matched_pairs": r.TRAIN_MATCHED_PAIRS,
            "criterion": RelationCriterion(
                rel_weight=r.REL_WEIGHT,
                rqc_weight=r.RQC_WEIGHT,
                no_relation_weight=r.NO_RELATION_WEIGHT,
                use_rqc_loss=r.USE_RQC_LOSS,
            ),
        }

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query_features: Tensor,
        mask_logits: Tensor,
        class_probs: Tensor,
        features: Dict[str, Tensor],
        clip_features: Optional[Tensor] = None,
        predicate_text: Optional[Tensor] = None,
        targets: Optional[Sequence[Dict[str, Tensor]]] = None,
        matches: Optional[Sequence[Tuple[Tensor, Tensor]]] = None,
        pair_mask: Optional[Tensor] = None,
    ):
        """See the registry docstring (:mod:`spade.modeling.relation.build`) for shapes.

        ``pair_mask`` (inference only): bool [B, Q, Q], the (subject, object) query pairs that may
        be selected; the others rank below every allowed pair (the meta-architecture passes the
        pairs of two different kept panoptic segments, so the top-M are not spent on queries
        that panoptic inference dropped)."""
        pooled_map = self._check_inputs(query_features, mask_logits, class_probs, features)
        self.predicates.check_text(predicate_text)
        q = self.relation_context(query_features, mask_logits)  # [B, Q, E]
        selection_logits = self.pair_selection_logits(q)  # [B, Q, Q]
        objectness = (1.0 - class_probs[..., -1].detach().float()).clamp(min=1e-6).log()  # [B, Q]
        ranking = selection_logits.detach() + objectness[:, :, None] + objectness[:, None, :]
        if pair_mask is not None and not self.training:
            if pair_mask.shape != ranking.shape:
                raise ValueError(
                    f"pair_mask {tuple(pair_mask.shape)} must be [B, Q, Q] = {tuple(ranking.shape)}"
                )
            ranking = ranking.masked_fill(~pair_mask.to(ranking.device), float("-inf"))
        masks = mask_logits.detach().float()
        if pooled_map.shape[-2:] != masks.shape[-2:]:
            masks = F.interpolate(
                masks, size=pooled_map.shape[-2:], mode="bilinear", align_corners=False
            )
        pair_inputs = (mask_boxes(masks > 0), masks.sigmoid(), pooled_map)  # boxes, soft masks, map
        if self.training:
            return self.training_losses(
                q, selection_logits, ranking, pair_inputs, predicate_text, targets, matches
            )
        return self.inference(
            q, ranking, pair_inputs, class_probs, mask_logits, clip_features, predicate_text
        )

    def training_losses(
        self, q, selection_logits, ranking, pair_inputs, predicate_text, targets, matches
    ) -> Dict[str, Tensor]:
        """Targets from the matcher, top-M pairs plus unselected GT pairs, L_rel and L_rqc."""
        B, Q, _ = q.shape
        if targets is None or matches is None or len(targets) != B or len(matches) != B:
            raise ValueError("training the relation head needs `targets` and `matches` per image")
        num_predicates = self.predicates.vocabulary_size(predicate_text)
        boxes, soft_masks, pooled_map = pair_inputs  # [B, Q, 4], [B, Q, h_f, w_f], [B, C_f, ..]
        logits, rows, positives = [], [], []
        for b in range(B):
            if "gt_relations" not in targets[b]:
                raise KeyError(f"targets[{b}] has no 'gt_relations' (keys: {sorted(targets[b])})")
            query_idx, gt_idx = matches[b]
            target_pairs, target_predicates = relation_targets(
                targets[b]["gt_relations"],
                query_idx.to(q.device),
                gt_idx.to(q.device),
                num_predicates,
                image_index=b,
            )
            pairs = add_target_pairs(select_pairs(ranking[b], self.num_pairs), target_pairs, Q)
            if self.train_matched_pairs:
                pairs = add_target_pairs(pairs, matched_pairs(query_idx.to(q.device)), Q)
            logits.append(
                self.predicate_logits(
                    q[b], pairs, boxes[b], soft_masks[b], pooled_map[b], predicate_text
                )
            )
            rows.append(predicate_targets(pairs, target_pairs, target_predicates, num_predicates))
            positives.append(target_pairs)
        return self.criterion(logits, rows, selection_logits, positives)

    def inference(
        self, q, ranking, pair_inputs, class_probs, mask_logits, clip_features, predicate_text
    ) -> List[Dict[str, Tensor]]:
        """Per image {"pairs" [M, 2], "pair_scores" [M], "predicate_scores" [M, P]}."""
        num_predicates = self.predicates.vocabulary_size(predicate_text)
        boxes, soft_masks, pooled_map = pair_inputs  # [B, Q, 4], [B, Q, h_f, w_f], [B, C_f, ..]
        query_scores = class_probs[..., :-1].detach().float().max(dim=-1).values  # [B, Q]
        use_clip = clip_features is not None and self.use_clip_branch and predicate_text is not None
        results = []
        for b in range(q.shape[0]):
            pairs = select_pairs(ranking[b], self.num_pairs)
            logits = self.predicate_logits(
                q[b], pairs, boxes[b], soft_masks[b], pooled_map[b], predicate_text
            )
            probs = logits.float().softmax(dim=-1)  # [M, P + 1]
            if use_clip:
                p_clip = self.predicates.clip_probabilities(
                    clip_features[b],
                    mask_logits[b].detach(),
                    pairs,
                    predicate_text,
                    self.pair_chunk,
                )
                probs = self.predicates.fuse_clip(probs, p_clip)
            results.append(
                {
                    "pairs": pairs,
                    "pair_scores": query_scores[b, pairs[:, 0]] * query_scores[b, pairs[:, 1]],
                    "predicate_scores": probs[:, :num_predicates],  # no-relation column dropped
                }
            )
        return results

    # ------------------------------------------------------------------ named steps
    def relation_context(self, query_features: Tensor, mask_logits: Tensor) -> Tensor:
        """Project queries and refine them with RGT_g and RGT_l over G: -> [B, Q, E]."""
        q = self.input_proj(query_features)
        if len(self.global_layers) == 0 and self.local_gcn is None:
            return q
        graph = build_spatial_semantic_graph(
            mask_logits.detach(), query_features.detach(), **self.graph_args
        )
        for layer in self.global_layers:
            q = layer(q, graph)
        if self.local_gcn is not None:
            q = self.local_gcn(q, graph, normalized_adjacency(graph).to(q.dtype))
        return q

    def pair_selection_logits(self, q: Tensor) -> Tensor:
        """s[b, i, j] = t * cos(W_s q_i, W_o q_j): [B, Q, E] -> [B, Q, Q] (diagonal not masked)."""
        subj = F.normalize(self.subject_proj(q), dim=-1)
        obj = F.normalize(self.object_proj(q), dim=-1)
        scale = self.selection_logit_scale.clamp(max=4.6052).exp()  # temperature at most 100
        return scale * subj @ obj.transpose(1, 2)

    def predicate_logits(
        self,
        q: Tensor,
        pairs: Tensor,
        boxes: Tensor,
        soft_masks: Tensor,
        pooled_map: Tensor,
        predicate_text: Optional[Tensor],
    ) -> Tensor:
        """Predicate logits [M, P + 1] (last = no relation) of one image's pairs [M, 2].

        q [Q, E], boxes [Q, 4], soft_masks [Q, h_f, w_f], pooled_map [C_f, h_f, w_f]. Pairs are
        processed in chunks of PAIR_CHUNK.
        """
        out = []
        for start in range(0, len(pairs), self.pair_chunk):
            chunk = pairs[start : start + self.pair_chunk]
            pooled = joint_mask_pool(pooled_map[None], soft_masks[None], chunk[None])[0]  # [m, C_f]
            geometry = self.geometry_embed(pair_geometry(boxes[chunk[:, 0]], boxes[chunk[:, 1]]))
            x = torch.cat([q[chunk[:, 0]], q[chunk[:, 1]], geometry, self.pool_proj(pooled)], -1)
            out.append(self.predicates(self.pair_mlp(x), predicate_text))
        if not out:
            width = self.predicates.vocabulary_size(predicate_text) + 1
            return q.new_zeros(0, width) + 0.0 * q.sum()
        return torch.cat(out, dim=0)

    def _check_inputs(self, query_features, mask_logits, class_probs, features) -> Tensor:
        """Validate shapes; return the map pooled under joint masks [B, C_f, h_f, w_f]."""
        if query_features.dim() != 3:
            raise ValueError(f"query_features must be [B, Q, C], got {tuple(query_features.shape)}")
        B, Q, _ = query_features.shape
        if mask_logits.dim() != 4 or tuple(mask_logits.shape[:2]) != (B, Q):
            raise ValueError(
                f"mask_logits must be [B={B}, Q={Q}, h, w], got {tuple(mask_logits.shape)}"
            )
        if class_probs.dim() != 3 or tuple(class_probs.shape[:2]) != (B, Q):
            raise ValueError(
                f"class_probs must be [B={B}, Q={Q}, K+1], got {tuple(class_probs.shape)}"
            )
        if self.pool_feature not in features:
            raise KeyError(
                f"features lacks {self.pool_feature!r} (RELATION.POOL_FEATURE); "
                f"has {sorted(features)}"
            )
        return features[self.pool_feature]


@SPADE_RELATION_HEAD_REGISTRY.register()
class PairMLPRelationHead(RGTRelationHead):
    """The plain pair-MLP baseline: pair features -> MLP -> predicates, without G, RGT_g or RGT_l
    (the same as ``RGTRelationHead`` with ``RELATION.BASELINE_PAIR_MLP: True``)."""

    @classmethod
    def from_config(cls, cfg) -> dict:
        args = super().from_config(cfg)
        args["baseline_pair_mlp"] = True
        return args


def _fusion(relation_value: float, open_vocab_value: float) -> float:
    """RELATION.FUSION_ALPHA / _BETA, or OPEN_VOCAB's value where they are -1."""
    return open_vocab_value if relation_value == -1.0 else relation_value
