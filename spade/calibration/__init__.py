"""Stage 1 of SPADE: inversion-guided calibration of LoRA + the implicit-text MLP adapter.

* :mod:`.inversion`   DDIM / BELM inversion and deterministic sampling.
* :mod:`.attention`   cross-attention capture (attn2 processors) and role-map aggregation.
* :mod:`.teacher`     teacher maps A_i and their safetensors cache.
* :mod:`.model`       the student (A_i') and L_cal.
* :mod:`.builder`     parts, cache, dataset items and loaders from the config.
* :mod:`.checkpoint`  trainable-only safetensors checkpoints + tensor-only trainer state.
* :mod:`.trainer`     the detectron2 trainer; :mod:`.visualize` the teacher / student figure.
"""

from .attention import AttentionStore, CrossAttentionRecorder, capture_cross_attention
from .inversion import belm_invert, belm_sample, ddim_invert, ddim_sample, make_grid
from .model import CalibrationModel, calibration_loss
from .teacher import TeacherMapCache, TeacherMapGenerator
from .trainer import CalibrationTrainer

__all__ = [
    "AttentionStore",
    "CrossAttentionRecorder",
    "capture_cross_attention",
    "belm_invert",
    "belm_sample",
    "ddim_invert",
    "ddim_sample",
    "make_grid",
    "CalibrationModel",
    "calibration_loss",
    "TeacherMapCache",
    "TeacherMapGenerator",
    "CalibrationTrainer",
]
