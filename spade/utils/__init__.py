"""Shared utilities.

``io``: atomic file writes (re-exported here). ``visualizer`` (with ``scene_graph_view``,
``scene_graph_drawing``, ``canvas``): panoptic overlays and scene-graph drawings; import it
explicitly (it loads matplotlib).
"""

from .io import atomic_save_safetensors, atomic_write, atomic_write_bytes, atomic_write_json

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_save_safetensors"]
