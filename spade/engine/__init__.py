"""Training infrastructure shared by SPADE's two stages: trainer, optimizer, checkpoints."""

from .checkpoint import SafetensorsCheckpointer, frozen_state_prefixes, trainable_state_dict
from .optimizer import build_spade_optimizer, spade_param_groups
from .trainer import (
    LossGuard,
    NonFiniteLossError,
    SkipNonFiniteStep,
    SPADETrainer,
    build_train_loop,
    contiguous_group_norm_inputs,
)

__all__ = [
    "SafetensorsCheckpointer",
    "frozen_state_prefixes",
    "trainable_state_dict",
    "build_spade_optimizer",
    "spade_param_groups",
    "LossGuard",
    "NonFiniteLossError",
    "SkipNonFiniteStep",
    "SPADETrainer",
    "build_train_loop",
    "contiguous_group_norm_inputs",
]
