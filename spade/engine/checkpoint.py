"""Checkpoints as safetensors, for both SPADE stages.

A checkpoint named ``model_0004999`` is two files in the output directory:

- ``model_0004999.safetensors``: the model's weights (flat name -> tensor), without the frozen
  pretrained parts that are rebuilt from their own files at start-up (the diffusion UNet / VAE and
  CLIP: any module may list them through a ``frozen_state_prefixes()`` method);
- ``model_0004999.state.pth``: the trainer state (iteration, optimizer, scheduler, hooks) loaded
  with ``torch.load(weights_only=True)``, which never unpickles arbitrary objects.

Both are written atomically, then ``last_checkpoint`` is re-tagged atomically, so a process killed
at any moment leaves the previous checkpoint intact and ``--resume`` finds a complete one.
Loading accepts ``.safetensors`` and ``.pth`` (weights_only); pickled ``.pkl`` files are refused.
"""

import os
from typing import Any, Dict, List

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from spade.utils.io import atomic_save_safetensors, atomic_write, atomic_write_bytes

__all__ = ["SafetensorsCheckpointer", "frozen_state_prefixes", "trainable_state_dict"]

STATE_SUFFIX = ".state.pth"


def frozen_state_prefixes(model: nn.Module) -> List[str]:
    """State-dict key prefixes that are rebuilt from pretrained files and so are not saved.

    Every submodule with a ``frozen_state_prefixes()`` method contributes its prefixes (relative
    to itself), joined with the submodule's own name.
    """
    model = _unwrap(model)
    prefixes = []
    for name, module in model.named_modules():
        fn = getattr(module, "frozen_state_prefixes", None)
        if callable(fn):
            base = f"{name}." if name else ""
            prefixes.extend(base + p for p in fn())
    return prefixes


def trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict without the keys under :func:`frozen_state_prefixes`."""
    model = _unwrap(model)
    prefixes = tuple(frozen_state_prefixes(model))
    return {
        k: v for k, v in model.state_dict().items() if not (prefixes and k.startswith(prefixes))
    }


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class SafetensorsCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer that writes safetensors and never unpickles (see module doc)."""

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        try:
            return super().load(path, *args, **kwargs)
        finally:  # a failed load must not leave the parent's per-load state behind
            self._parsed_url_during_load = None

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        weights_file = os.path.join(self.save_dir, f"{name}.safetensors")
        state_file = os.path.join(self.save_dir, f"{name}{STATE_SUFFIX}")
        state = {key: obj.state_dict() for key, obj in self.checkpointables.items()}
        state.update(kwargs)
        self.logger.info(f"Saving checkpoint to {weights_file}")
        atomic_save_safetensors(
            trainable_state_dict(self.model), weights_file, metadata={"format": "spade"}
        )
        atomic_write(state_file, lambda tmp: torch.save(state, tmp))
        self.tag_last_checkpoint(os.path.basename(weights_file))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_bytes(
            os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename.encode()
        )

    def get_all_checkpoint_files(self) -> List[str]:
        return [
            os.path.join(self.save_dir, f)
            for f in sorted(os.listdir(self.save_dir))
            if f.endswith(".safetensors")
        ]

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".safetensors"):
            from safetensors.torch import load_file

            try:
                checkpoint: Dict[str, Any] = {"model": load_file(filename)}
            except Exception as e:  # safetensors raises its own error types on bad headers
                raise ValueError(f"Checkpoint {filename} is not a valid safetensors file: {e}")
            state_file = filename[: -len(".safetensors")] + STATE_SUFFIX
            if os.path.isfile(state_file):
                checkpoint.update(_load_weights_only(state_file))
            return checkpoint
        if filename.endswith((".pth", ".pt")):
            loaded = _load_weights_only(filename)
            return loaded if "model" in loaded else {"model": loaded}
        raise ValueError(
            f"Checkpoint {filename}: only .safetensors and .pth (loaded with weights_only=True) "
            "are accepted; pickled files are never loaded. Convert it to safetensors first."
        )

    def _load_model(self, checkpoint: Any):
        incompatible = super()._load_model(checkpoint)
        prefixes = tuple(frozen_state_prefixes(self.model))
        if prefixes and incompatible is not None:
            incompatible.missing_keys[:] = [
                k for k in incompatible.missing_keys if not k.startswith(prefixes)
            ]
        return incompatible


def _load_weights_only(filename: str) -> Dict[str, Any]:
    try:
        return torch.load(filename, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"Checkpoint {filename} could not be read with torch.load(weights_only=True) "
            f"(corrupt, truncated, or it holds pickled objects): {e}"
        ) from e
