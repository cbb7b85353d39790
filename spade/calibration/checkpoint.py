"""Checkpoints of stage 1: trainable weights as safetensors, trainer state as a tensor-only file.

``<dir>/<name>.safetensors``: the LoRA (or attn2) + MLP adapter weights in the format of
:func:`spade.modeling.backbone.save_trainable_state_dict`, i.e. exactly what stage 2's
MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS loads (``model_final.safetensors`` is the final output).
``<dir>/<name>.state.pth``: iteration, optimizer and LR-scheduler state, written with
``torch.save`` and read back with ``weights_only=True`` (no arbitrary unpickling).
``<dir>/last_checkpoint``: the name of the newest checkpoint. Every file is written atomically.

The class offers the interface detectron2's PeriodicCheckpointer hook uses (``save``,
``get_checkpoint_file``, ``path_manager``) plus :meth:`resume_or_load`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from spade.modeling.backbone import load_trainable_state_dict, save_trainable_state_dict
from spade.utils.io import atomic_write, atomic_write_bytes

__all__ = ["CalibrationCheckpointer"]

logger = logging.getLogger(__name__)

WEIGHTS_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.pth"


class CalibrationCheckpointer:
    """Save / load the calibration model's trainable parts and the trainer state.

    Args:
        model: the CalibrationModel (``.unet``, ``.implicit_text``).
        save_dir: directory of the checkpoints (cfg.OUTPUT_DIR).
        save_to_disk: write files (True on the main process only).
        checkpointables: objects with ``state_dict`` / ``load_state_dict`` saved in the state
            file (optimizer, scheduler, trainer).
    """

    def __init__(
        self, model, save_dir: str, save_to_disk: Optional[bool] = None, **checkpointables
    ):
        self.model = model
        self.save_dir = save_dir
        self.save_to_disk = comm.is_main_process() if save_to_disk is None else save_to_disk
        self.checkpointables = checkpointables
        self.path_manager = PathManager

    def _paths(self, name: str):
        base = os.path.join(self.save_dir, name)
        return base + WEIGHTS_SUFFIX, base + STATE_SUFFIX

    def save(self, name: str, **extra: Any) -> None:
        """Write ``<name>.safetensors`` + ``<name>.state.pth`` and mark it as the last one."""
        if not self.save_to_disk:
            return
        weights, state_path = self._paths(name)
        iteration = int(extra.get("iteration", -1))
        save_trainable_state_dict(
            weights,
            self.model.unet,
            self.model.implicit_text,
            extra_metadata={"iteration": str(iteration)},
        )
        state = {k: v.state_dict() for k, v in self.checkpointables.items()}
        state.update(extra)
        atomic_write(state_path, lambda tmp: torch.save(state, tmp))
        atomic_write_bytes(os.path.join(self.save_dir, "last_checkpoint"), name.encode())
        logger.info("Saved calibration checkpoint %s", weights)

    def get_checkpoint_file(self) -> str:
        """Weights path of the last checkpoint ("" when none)."""
        marker = os.path.join(self.save_dir, "last_checkpoint")
        if not os.path.isfile(marker):
            return ""
        with open(marker) as f:
            name = f.read().strip()
        return self._paths(name)[0]

    def has_checkpoint(self) -> bool:
        path = self.get_checkpoint_file()
        return bool(path) and os.path.isfile(path)

    def load(self, weights_path: str, load_state: bool = True) -> Dict[str, Any]:
        """Load trainable weights (and, when present and asked, the trainer state).

        Returns the remaining entries of the state file (e.g. ``iteration``)."""
        load_trainable_state_dict(weights_path, self.model.unet, self.model.implicit_text)
        state_path = weights_path[: -len(WEIGHTS_SUFFIX)] + STATE_SUFFIX
        if not load_state or not os.path.isfile(state_path):
            return {}
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{state_path}: cannot read trainer state ({e})") from e
        for key, obj in self.checkpointables.items():
            if key not in state:
                raise KeyError(f"{state_path}: missing trainer state {key!r}")
            obj.load_state_dict(state.pop(key))
        return state

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """With ``resume`` and a last checkpoint in ``save_dir``: load it with its trainer state.
        Otherwise load only the weights of ``path`` when given (MODEL.WEIGHTS)."""
        if resume and self.has_checkpoint():
            return self.load(self.get_checkpoint_file(), load_state=True)
        if path:
            return self.load(path, load_state=False)
        return {}
