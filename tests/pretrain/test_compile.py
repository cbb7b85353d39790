"""PRETRAIN.COMPILE: torch.compile of the UNet in place, its modes and errors, and a compiled
grounding run that trains as the eager one does (same losses, same checkpoint keys)."""

import json
import logging
import os

import pytest
import torch
from pretrain_helpers import tiny_cfg
from safetensors.torch import load_file
from torch import nn

from spade.pretrain import engine, run_pretraining
from spade.pretrain.engine import compile_network, get_task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class TwoNets(nn.Module):
    compile_modules = ("inner.net",)

    def __init__(self):
        super().__init__()
        self.inner = nn.Module()
        self.inner.net = nn.Linear(3, 2)
        self.other = nn.Linear(2, 2)


def compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_off_leaves_the_model_and_a_bad_mode_names_the_key():
    model = TwoNets()
    assert compile_network(model, "off", "cpu") == []
    assert not compiled(model.inner.net)
    with pytest.raises(ValueError, match=r"PRETRAIN\.COMPILE must be one of .*'fast'"):
        compile_network(model, "fast", "cpu")


@pytest.mark.skipif(not engine._cpp_compiler(), reason="torch.compile finds no C++ compiler")
def test_the_smoke_test_passes_where_a_compiler_is_found_and_auto_then_compiles():
    assert engine._compile_smoke_test() == ""
    model = TwoNets()
    assert compile_network(model, "auto", "cpu") == ["inner.net"]
    assert compiled(model.inner.net)


def test_on_compiles_the_named_module_in_place_and_keeps_its_keys():
    model = TwoNets()
    keys = list(model.state_dict())
    assert compile_network(model, "ON", "cpu") == ["inner.net"]
    assert compiled(model.inner.net) and not compiled(model.other)
    assert list(model.state_dict()) == keys  # no "_orig_mod." prefix: checkpoints unchanged


def test_auto_skips_cuda_a_missing_compiler_and_models_without_modules(monkeypatch, caplog):
    assert compile_network(TwoNets(), "auto", "cuda:0") == []
    monkeypatch.setattr(engine, "_cpp_compiler", lambda: "")
    model = TwoNets()
    with caplog.at_level(logging.WARNING, logger="spade.pretrain.engine"):
        assert compile_network(model, "auto", "cpu") == []
    assert not compiled(model.inner.net)
    assert "finds no C++ compiler" in caplog.text and "inner.net" in caplog.text
    # a compiler that cannot build a kernel (no Python headers, say): eager, and the error said
    monkeypatch.setattr(engine, "_cpp_compiler", lambda: "g++")
    monkeypatch.setattr(engine, "_compile_smoke_test", lambda: "CalledProcessError: Python.h")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spade.pretrain.engine"):
        assert compile_network(model, "auto", "cpu") == []
    assert not compiled(model.inner.net)
    assert "fails on a test kernel (CalledProcessError: Python.h)" in caplog.text
    # the CLIP and VAE tasks name nothing to compile: auto leaves them, on is an error
    assert compile_network(nn.Linear(2, 2), "auto", "cpu") == []
    with pytest.raises(ValueError, match="only the UNet task supports it"):
        compile_network(nn.Linear(2, 2), "on", "cpu")


@pytest.mark.skipif(not engine._cpp_compiler(), reason="torch.compile finds no C++ compiler")
def test_a_compiled_grounding_run_trains_as_the_eager_one(stage0_root, tmp_path, caplog):
    made = {"clip": stage0_root / "clip" / "open_clip_config.json"}
    made["vae"] = stage0_root / "sd" / "vae" / "config.json"
    for task in ("clip", "vae"):
        if not made[task].exists():  # the frozen models the UNet trains on
            cfg, args = tiny_cfg(
                os.path.join(ROOT, "configs", "pretrain", f"{task}_tiny.yaml"), stage0_root, task
            )
            run_pretraining(cfg, args)
    config = os.path.join(ROOT, "configs", "pretrain", "unet_tiny_grounded.yaml")
    runs = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        extra = [
            "MODEL.WEIGHTS", "",
            "PRETRAIN.EXPORT_DIR", str(out / "sd"),
            "OUTPUT_DIR", str(out),
            "PRETRAIN.COMPILE", mode,
            "PRETRAIN.UNET.GROUNDING_PIXEL_WEIGHT", "0.05",
        ]  # fmt: skip
        cfg, args = tiny_cfg(config, stage0_root, "unet", max_iter=2, extra=extra)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="spade.pretrain.engine"):
            run_pretraining(cfg, args)
        assert ("PRETRAIN.COMPILE=on: unet compiled in place" in caplog.text) == (mode == "on")
        rows = [json.loads(line) for line in open(out / "metrics.json")]
        runs[mode] = (rows[-1], load_file(str(out / "model_final.safetensors")))
    start = get_task(cfg).build_model(cfg).state_dict()  # both runs' seeded initial weights
    (eager, eager_weights), (fast, fast_weights) = runs["off"], runs["on"]
    for key in ("loss_eps", "loss_ground", "loss_ground_pixel"):
        assert fast[key] == pytest.approx(eager[key], rel=1e-3), key
    # the same keys (no "_orig_mod."), and the same two-step update of the weights (AdamW turns
    # rounding-sized gradient differences into lr-sized ones where a gradient is near 0, so the
    # whole update is compared, as MODEL_ZOO's precision A/Bs compare them)
    assert sorted(fast_weights) == sorted(eager_weights) == sorted(start)
    update = {
        m: torch.cat([(w[k] - start[k]).flatten() for k in sorted(start)])
        for m, (_, w) in runs.items()
    }
    assert update["off"].norm() > 0
    assert torch.nn.functional.cosine_similarity(update["off"], update["on"], dim=0) > 0.999
    assert (update["on"] - update["off"]).norm() < 0.05 * update["off"].norm()
