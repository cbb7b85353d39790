"""Manifests of the shipped miniature models, and their verification at load time.

Every exported model folder holds ``spade_manifest.json``: what was trained (model config, seed,
corpus seed range, iterations, wall time, commit of the training code), the measured gates, and
the SHA-256 of each weight file and config file. :func:`verify_model_folder` re-checks the
hashes, so a weight file that was truncated, corrupted or swapped, or a config edited after
training, is a clear error naming the file and the config key that pointed at it. Folders without
a manifest (SD 1.5, a downloaded CLIP) are loaded as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from typing import Dict, Iterable, Optional

from spade.utils.io import atomic_write_json

__all__ = [
    "MANIFEST_NAME",
    "file_sha256",
    "code_commit",
    "write_manifest",
    "read_manifest",
    "verify_model_folder",
]

MANIFEST_NAME = "spade_manifest.json"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_commit(root: Optional[str] = None) -> str:
    """The git commit of the training code ("+dirty" when spade/ has uncommitted changes).

    ``SPADE_CODE_COMMIT`` in the environment wins: a copy of the tree without its .git (a lent
    machine) states the commit it was copied from."""
    if os.environ.get("SPADE_CODE_COMMIT"):
        return os.environ["SPADE_CODE_COMMIT"]
    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "spade", "projects", "configs/pretrain"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_manifest(folder: str, files: Iterable[str], info: Dict) -> str:
    """Write ``folder/spade_manifest.json`` with ``info`` and the hashes of ``files`` (names
    relative to ``folder``). Returns its path."""
    hashes = {name: file_sha256(os.path.join(folder, name)) for name in files}
    path = os.path.join(folder, MANIFEST_NAME)
    atomic_write_json(path, dict(info, files=hashes), indent=2)
    return path


def read_manifest(folder: str) -> Optional[Dict]:
    """The manifest of ``folder``, None when it has none; a malformed one is an error."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON manifest ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path}: manifest has no 'files' table of SHA-256 hashes")
    return manifest


def verify_model_folder(folder: str, key: str) -> Optional[Dict]:
    """Check every file listed in ``folder``'s manifest against its recorded SHA-256.

    Args:
        folder: a model folder (e.g. ``models/synthpsg-tiny-sd/unet``).
        key: the config key that named it (for the message).
    Returns:
        the manifest, or None when the folder has none.
    Raises:
        FileNotFoundError / ValueError naming the file and ``key``.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    for name, digest in sorted(manifest["files"].items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{key}: {path} is listed in {os.path.join(folder, MANIFEST_NAME)} but missing"
            )
        found = file_sha256(path)
        if found != digest:
            raise ValueError(
                f"{key}: {path} does not match {os.path.join(folder, MANIFEST_NAME)} "
                f"(sha256 {found[:12]}... != {digest[:12]}...): the file is corrupt or was "
                "replaced; restore it (git checkout) or retrain it with `make pretrain`"
            )
    return manifest
