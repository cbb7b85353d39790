"""SPADE's relation head: spatial-semantic graph, RGT_g / RGT_l, relation queries, predicates."""

from .build import SPADE_RELATION_HEAD_REGISTRY, build_relation_head
from .graph import build_spatial_semantic_graph
from .inference import relation_inference
from .predicates import PredicateClassifier
from .relation_criterion import RelationCriterion
from .relation_head import PairMLPRelationHead, RGTRelationHead  # registers both heads
from .rgt import GraphConvolution, RGTGlobalLayer, RGTLocal, normalized_adjacency

__all__ = [
    "SPADE_RELATION_HEAD_REGISTRY",
    "build_relation_head",
    "build_spatial_semantic_graph",
    "relation_inference",
    "RelationCriterion",
    "PredicateClassifier",
    "RGTRelationHead",
    "PairMLPRelationHead",
    "RGTGlobalLayer",
    "RGTLocal",
    "GraphConvolution",
    "normalized_adjacency",
]
