"""Dataset registration: PSG-format files, VG150, SynthPSG (built-ins registered on import)."""

from . import builtin  # noqa: F401  (registers psg_* when present and synthpsg_*)
from .ov_settings import OV_SETTINGS, ov_dataset_names, ov_setting_file, ov_setting_split
from .psg import all_class_names, load_ov_split, load_psg_json, register_psg, write_panoptic_json
from .synthetic import register_synthpsg, synthpsg_dataset_names
from .vg import VG150_OV_SPLIT_FILE, load_vg150, register_vg150

__all__ = [
    "OV_SETTINGS",
    "ov_dataset_names",
    "ov_setting_file",
    "ov_setting_split",
    "all_class_names",
    "load_ov_split",
    "load_psg_json",
    "register_psg",
    "write_panoptic_json",
    "register_synthpsg",
    "synthpsg_dataset_names",
    "register_vg150",
    "load_vg150",
    "VG150_OV_SPLIT_FILE",
]
