"""One checkpointer for both SPADE stages: weights as safetensors, trainer state tensor-only.

A checkpoint named ``model_0004999`` is two files in the output directory:

- ``model_0004999.safetensors``: the model's weights. By default the flat state dict without the
  frozen pretrained parts that are rebuilt from their own files at start-up (stage 2: the
  diffusion UNet / VAE and CLIP; any module lists them through a ``frozen_state_prefixes()``
  method). A stage whose weights file has a format of its own passes ``weights_io``, an object
  with ``save(path, metadata)`` and ``load(path)`` (stage 1: LoRA + adapter in the format stage 2
  loads through MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS, see
  :class:`spade.calibration.builder.TrainableWeightsIO`);
- ``model_0004999.state.pth``: the trainer state (iteration, optimizer, scheduler, hooks) loaded
  with ``torch.load(weights_only=True)``, which never unpickles arbitrary objects.

Both are written atomically, then ``last_checkpoint`` is re-tagged atomically, so a process killed
at any moment leaves the previous checkpoint intact and ``--resume`` finds a complete one.
Loading accepts ``.safetensors`` and ``.pth`` (weights_only); pickled ``.pkl`` files are refused,
and a missing or unreadable file is a one-line error naming it.
"""

import os
from typing import Any, Dict, List

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from spade.utils.io import atomic_save_safetensors, atomic_write, atomic_write_bytes

__all__ = ["SafetensorsCheckpointer", "frozen_state_prefixes", "trainable_state_dict"]

WEIGHTS_SUFFIX = ".safetensors"
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
    """A DetectionCheckpointer that writes safetensors and never unpickles (see module doc).

    Args:
        model, save_dir, save_to_disk, checkpointables: as for DetectionCheckpointer.
        weights_io: the stage's own weights format (``save(path, metadata)``, ``load(path)``);
            None = the flat state dict without the frozen prefixes.
    """

    def __init__(
        self, model, save_dir="", *, save_to_disk=None, weights_io=None, **checkpointables
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.weights_io = weights_io

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        if path and not os.path.isfile(path) and "://" not in path:
            raise FileNotFoundError(
                f"checkpoint {path} does not exist "
                f"(MODEL.WEIGHTS or {self.save_dir}/last_checkpoint)"
            )
        try:
            return super().load(path, *args, **kwargs)
        finally:  # a failed load must not leave the parent's per-load state behind
            self._parsed_url_during_load = None

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        weights_file = os.path.join(self.save_dir, f"{name}{WEIGHTS_SUFFIX}")
        state_file = os.path.join(self.save_dir, f"{name}{STATE_SUFFIX}")
        state = {key: obj.state_dict() for key, obj in self.checkpointables.items()}
        state.update(kwargs)
        self.logger.info(f"Saving checkpoint to {weights_file}")
        metadata = {"iteration": str(int(kwargs.get("iteration", -1)))}
        if self.weights_io is not None:
            self.weights_io.save(weights_file, metadata)
        else:
            metadata["format"] = "spade"
            tensors = trainable_state_dict(self.model)
            atomic_save_safetensors(tensors, weights_file, metadata=metadata)
        atomic_write(state_file, lambda tmp: torch.save(state, tmp))
        self.tag_last_checkpoint(os.path.basename(weights_file))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_bytes(
            os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename.encode()
        )

    def get_checkpoint_file(self) -> str:
        path = super().get_checkpoint_file()
        if path and not os.path.splitext(path)[1] and os.path.isfile(path + WEIGHTS_SUFFIX):
            path += WEIGHTS_SUFFIX  # last_checkpoint written as a bare name
        return path

    def get_all_checkpoint_files(self) -> List[str]:
        return [
            os.path.join(self.save_dir, f)
            for f in sorted(os.listdir(self.save_dir))
            if f.endswith(WEIGHTS_SUFFIX)
        ]

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(WEIGHTS_SUFFIX):
            if self.weights_io is not None:
                checkpoint: Dict[str, Any] = {"model": None, "__weights_file__": filename}
            else:
                checkpoint = {"model": _read_safetensors(filename)}
            state_file = filename[: -len(WEIGHTS_SUFFIX)] + STATE_SUFFIX
            if os.path.isfile(state_file):
                checkpoint.update(_load_weights_only(state_file))
            return checkpoint
        if filename.endswith((".pth", ".pt")) and self.weights_io is None:
            loaded = _load_weights_only(filename)
            return loaded if "model" in loaded else {"model": loaded}
        accepted = ".safetensors" if self.weights_io is not None else ".safetensors and .pth"
        raise ValueError(
            f"checkpoint {filename}: only {accepted} (loaded with weights_only=True) are "
            "accepted; pickled files are never loaded. Convert it to safetensors first."
        )

    def _load_model(self, checkpoint: Any):
        weights_file = checkpoint.pop("__weights_file__", None)
        if weights_file is not None:
            checkpoint.pop("model", None)
            self.weights_io.load(weights_file)
            return None
        incompatible = super()._load_model(checkpoint)
        prefixes = tuple(frozen_state_prefixes(self.model))
        if prefixes and incompatible is not None:
            incompatible.missing_keys[:] = [
                k for k in incompatible.missing_keys if not k.startswith(prefixes)
            ]
        return incompatible


def _read_safetensors(filename: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(filename)
    except Exception as e:  # safetensors raises its own error types on bad headers
        raise ValueError(f"checkpoint {filename} is not a valid safetensors file: {e}") from None


def _load_weights_only(filename: str) -> Dict[str, Any]:
    try:
        return torch.load(filename, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"checkpoint {filename} could not be read with torch.load(weights_only=True) "
            f"(corrupt, truncated, or it holds pickled objects): {first}"
        ) from None
