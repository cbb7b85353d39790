"""Atomic file writes shared by SPADE's parts (checkpoints, caches, predictions, demo outputs).

Every writer puts its data into a temporary file in the destination's own directory, flushes and
fsyncs it, then ``os.replace``-s it over the destination, so a reader (or a process killed
mid-write) never sees a half-written file: the destination holds either the old or the new bytes.
"""

import json
import os
import tempfile
from typing import Any, Callable, Dict, Optional

import torch

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_save_safetensors", "atomic_write"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write_fn: Callable[[str], None]) -> None:
    """Run ``write_fn(tmp_path)`` on a temporary file next to ``path``, then move it onto ``path``.

    Args:
        path: destination file. Its parent directory is created when missing.
        write_fn: writes the complete content to the path it is given (it may open it by name).

    The temporary file is removed when ``write_fn`` raises, and the exception propagates.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory
    )
    os.close(fd)
    try:
        write_fn(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp makes 0600; use normal perms
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` (bytes) to ``path`` atomically."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"atomic_write_bytes({path!r}): data must be bytes, got {type(data).__name__}"
        )

    def _write(tmp_path: str) -> None:
        with open(tmp_path, "wb") as f:
            f.write(data)

    atomic_write(path, _write)


def atomic_write_json(path: str, obj: Any, indent: Optional[int] = None) -> None:
    """Serialise ``obj`` as JSON (UTF-8) and write it to ``path`` atomically.

    The object is serialised before anything touches the disk, so an object that JSON cannot
    encode raises ``TypeError`` and leaves ``path`` unchanged.
    """
    try:
        text = json.dumps(obj, indent=indent, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"atomic_write_json({path!r}): object is not JSON-serialisable: {e}") from e
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(
    tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None
) -> None:
    """Save a flat dict of tensors as a safetensors file at ``path`` atomically.

    Args:
        tensors: name -> tensor. Tensors are made contiguous and moved to the CPU; tensors that
            share storage are cloned (safetensors refuses shared storage).
        path: destination ``.safetensors`` file.
        metadata: optional str -> str header metadata (e.g. the config hash or the iteration).
    """
    from safetensors.torch import save_file

    if not isinstance(tensors, dict):
        raise TypeError(
            f"atomic_save_safetensors({path!r}): tensors must be a dict, "
            f"got {type(tensors).__name__}"
        )
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"atomic_save_safetensors({path!r}): key {name!r} is a {type(value).__name__}, "
                "not a tensor"
            )
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(
                f"atomic_save_safetensors({path!r}): metadata keys/values must be str: {bad}"
            )
    prepared = {name: value.detach().cpu().contiguous().clone() for name, value in tensors.items()}
    atomic_write(path, lambda tmp_path: save_file(prepared, tmp_path, metadata=metadata))
