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

Provenance: every submodule with a ``provenance()`` method adds its string metadata to the weights
file (stage 2: the ``spade_calibration`` record of the stage-1 weights, see spade.provenance), and
every submodule with ``check_provenance(metadata, path)`` checks a loaded file's metadata (a
checkpoint trained on other stage-1 weights is refused). A flat checkpoint that lacks keys of the
model (besides the frozen prefixes) or holds keys the model does not have is refused, naming the
file and the keys, unless ``allow_partial`` (MODEL.SPADE.ALLOW_PARTIAL_CHECKPOINT) is set, which
also lets a checkpoint without a provenance record load.
Loading accepts ``.safetensors`` and ``.pth`` (weights_only); pickled ``.pkl`` files are refused,
and a missing or unreadable file is a one-line error naming it.
"""

import os
from typing import Any, Dict, List, Optional

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
        allow_partial: load a flat checkpoint with missing / unexpected keys or without a
            provenance record (warned), instead of refusing it.
    """

    def __init__(
        self,
        model,
        save_dir="",
        *,
        save_to_disk=None,
        weights_io=None,
        allow_partial: bool = False,
        **checkpointables,
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.weights_io = weights_io
        self.allow_partial = bool(allow_partial)
        self._loading: Optional[str] = None

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        if path and not os.path.isfile(path) and "://" not in path:
            raise FileNotFoundError(
                f"checkpoint {path} does not exist "
                f"(MODEL.WEIGHTS or {self.save_dir}/last_checkpoint)"
            )
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:  # a failed load must not leave the parent's per-load state behind
            self._parsed_url_during_load = None
            self._loading = None

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
            metadata.update(model_provenance(self.model))
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
                checkpoint["__metadata__"] = _read_metadata(filename)
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
        metadata = checkpoint.pop("__metadata__", None)
        path = self._loading or "MODEL.WEIGHTS"
        if metadata is not None or not self.allow_partial:
            self._check_provenance(metadata or {}, path)
        incompatible = super()._load_model(checkpoint)
        prefixes = tuple(frozen_state_prefixes(self.model))
        if prefixes and incompatible is not None:
            incompatible.missing_keys[:] = [
                k for k in incompatible.missing_keys if not k.startswith(prefixes)
            ]
        if incompatible is not None and not self.allow_partial:
            _refuse_incompatible(incompatible, path)
        return incompatible

    def _check_provenance(self, metadata: Dict[str, str], path: str) -> None:
        for module in _unwrap(self.model).modules():
            fn = getattr(module, "check_provenance", None)
            if not callable(fn):
                continue
            try:
                fn(metadata, path)
            except ValueError:
                if not self.allow_partial:
                    raise
                self.logger.warning(f"{path}: provenance not checked (ALLOW_PARTIAL_CHECKPOINT)")


def model_provenance(model: nn.Module) -> Dict[str, str]:
    """Metadata of every submodule's ``provenance()`` (e.g. the stage-1 weights record)."""
    out: Dict[str, str] = {}
    for module in _unwrap(model).modules():
        fn = getattr(module, "provenance", None)
        if callable(fn):
            out.update(fn())
    return out


def _refuse_incompatible(incompatible, path: str) -> None:
    missing, unexpected = list(incompatible.missing_keys), list(incompatible.unexpected_keys)
    shapes = [k for k, *_ in getattr(incompatible, "incorrect_shapes", [])]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} keys of another shape {shapes[:3]}")
    if missing:
        parts.append(f"{len(missing)} model keys missing {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} keys the model lacks {unexpected[:3]}")
    raise ValueError(
        f"checkpoint {path} does not fit the model: {'; '.join(parts)} (another model's "
        "checkpoint?); set MODEL.SPADE.ALLOW_PARTIAL_CHECKPOINT True to load it with those "
        "parts left random"
    )


def _read_metadata(filename: str) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(filename, framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


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
