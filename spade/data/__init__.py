"""SPADE data layer: SynthPSG generator, dataset registration, mapper and loaders."""

from . import datasets  # noqa: F401  (registers the built-in datasets)
from .build import build_spade_test_loader, build_spade_train_loader, prepare_synthpsg
from .dataset_mapper import DATASET_MAPPERS, SPADEDatasetMapper, build_dataset_mapper
from .synthpsg import ensure_synthpsg, generate_synthpsg

__all__ = [
    "build_spade_train_loader",
    "build_spade_test_loader",
    "prepare_synthpsg",
    "SPADEDatasetMapper",
    "DATASET_MAPPERS",
    "build_dataset_mapper",
    "ensure_synthpsg",
    "generate_synthpsg",
]
