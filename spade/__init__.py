"""SPADE: Spatial-Aware Denoising Network for open-vocabulary panoptic scene graph generation.

``import spade`` is light, so the file-based evaluator (``python -m spade.evaluation...``) runs
without torch. Registration with detectron2 happens where it is needed, explicitly:
``spade.register_all()`` imports ``spade.data`` (PSG / VG150 / SynthPSG datasets, the mapper) and
``spade.modeling`` (diffusion backbone, SPADE meta-architecture, pixel decoder, heads); the entry
points call it through ``spade.engine.defaults.setup_cfg``, and importing either subpackage
registers its part. ``spade.add_spade_config`` is available here as before.
"""

import importlib

__version__ = "0.1.0"

__all__ = ["add_spade_config", "register_all", "__version__"]


def register_all() -> None:
    """Register SPADE's datasets, mapper, backbone, meta-architecture and heads with detectron2."""
    importlib.import_module(".data", __name__)  # registers datasets and the dataset mapper
    importlib.import_module(".modeling", __name__)  # registers the backbone, SPADE and heads


def __getattr__(name: str):
    if name == "add_spade_config":
        from .config import add_spade_config

        return add_spade_config
    raise AttributeError(f"module 'spade' has no attribute {name!r}")
