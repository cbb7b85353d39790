"""SPADE meta-architecture (registered in detectron2's META_ARCH_REGISTRY as "SPADE")."""

from .panoptic_inference import panoptic_inference
from .query_classifier import ClosedSetClassifier, OpenVocabClassifier
from .spade import SPADE  # registers META_ARCH "SPADE"
from .vocabulary import Vocabulary, vocabulary_from_metadata

__all__ = [
    "SPADE",
    "panoptic_inference",
    "ClosedSetClassifier",
    "OpenVocabClassifier",
    "Vocabulary",
    "vocabulary_from_metadata",
]
