"""Atomic writers of spade.utils.io: content, no leftovers, the old file kept on failure."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from spade.utils.io import (
    atomic_save_safetensors,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
)


def test_bytes_and_json_round_trip_without_leftovers(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(str(target), b"\x00\x01abc")
    assert target.read_bytes() == b"\x00\x01abc"
    atomic_write_json(str(tmp_path / "b.json"), {"x": [1, 2], "name": "é"})
    assert json.loads((tmp_path / "b.json").read_text(encoding="utf-8")) == {
        "x": [1, 2],
        "name": "é",
    }
    assert sorted(os.listdir(tmp_path)) == ["b.json", "sub"]
    assert os.listdir(tmp_path / "sub") == ["a.bin"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "c.json")
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError, match="c.json.*not JSON-serialisable"):
        atomic_write_json(path, {"bad": object()})

    def half_write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        atomic_write(path, half_write)
    assert json.load(open(path)) == {"ok": 1}
    assert os.listdir(tmp_path) == ["c.json"]
    with pytest.raises(TypeError, match="must be bytes"):
        atomic_write_bytes(path, "text")


def test_safetensors_shared_storage_and_metadata(tmp_path):
    base = torch.arange(6, dtype=torch.float32)
    path = str(tmp_path / "w.safetensors")
    atomic_save_safetensors(
        {"a": base, "b": base[2:4], "m": base.view(2, 3).t()}, path, {"it": "7"}
    )
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"it": "7"}
        assert f.get_tensor("b").tolist() == [2.0, 3.0]
        assert f.get_tensor("m").tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    with pytest.raises(TypeError, match="key 'x' is a list"):
        atomic_save_safetensors({"x": [1]}, path)
    with pytest.raises(TypeError, match="metadata"):
        atomic_save_safetensors({"a": base}, path, {"it": 7})
    assert os.listdir(tmp_path) == ["w.safetensors"]
