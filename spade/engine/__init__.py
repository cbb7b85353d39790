"""Training infrastructure shared by SPADE's two stages: trainer base, optimizer, checkpoints."""

from .checkpoint import SafetensorsCheckpointer, frozen_state_prefixes, trainable_state_dict
from .optimizer import build_spade_optimizer, spade_param_groups
from .trainer import GuardedTrainer, NonFiniteLossError, SPADETrainer, create_ddp_model

__all__ = [
    "SafetensorsCheckpointer",
    "frozen_state_prefixes",
    "trainable_state_dict",
    "build_spade_optimizer",
    "spade_param_groups",
    "GuardedTrainer",
    "NonFiniteLossError",
    "SPADETrainer",
    "create_ddp_model",
]
