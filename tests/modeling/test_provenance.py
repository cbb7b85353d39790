"""Provenance of stage-2 checkpoints (round trip and each refusal), the no-calibration ablation
and the leakage check of calibrated weights (TINY backbone, CPU)."""

import json
import os
import shutil

import pytest
import torch
from detectron2.data import MetadataCatalog
from torch import nn

from spade.data.datasets.ov_settings import ov_setting_split
from spade.data.synthpsg import OV_SPLIT
from spade.engine.checkpoint import SafetensorsCheckpointer
from spade.modeling.backbone import (
    apply_lora,
    build_clip,
    build_diffusion_parts,
    build_implicit_text_encoder,
    save_trainable_state_dict,
)
from spade.modeling.backbone.diffusion_backbone import DiffusionBackbone
from spade.modeling.backbone.lora import has_lora
from spade.provenance import (
    CALIBRATION_KEY,
    STAGE1_KEY,
    file_sha256,
    read_metadata,
    resolve_calibrated_weights,
    stage1_record,
)


class Holder(nn.Module):
    """A stage-2-like model: the diffusion backbone and a trainable head."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = DiffusionBackbone(cfg)
        self.head = nn.Linear(2, 2)


def _cfg(make_cfg, **overrides):
    cfg = make_cfg(**{"LORA.INIT_WEIGHTS": False, **overrides})
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def _stage1_file(path, cfg, seed, record=None):
    """A stage-1 output: non-zero LoRA and a perturbed adapter, with a stage-1 record."""
    diffusion, clip = build_diffusion_parts(cfg), build_clip(cfg)
    apply_lora(diffusion.unet, cfg.MODEL.SPADE.LORA, seed=seed)
    implicit = build_implicit_text_encoder(
        cfg, clip, diffusion.unet.config.cross_attention_dim, seed=seed
    )
    with torch.no_grad():
        for p in implicit.adapter.parameters():
            p.add_(0.1 * (seed + 1))
    meta = {STAGE1_KEY: json.dumps(record)} if record is not None else {}
    save_trainable_state_dict(str(path), diffusion.unet, implicit, extra_metadata=meta)
    return str(path)


CLOSED_RECORD = stage1_record(
    "synthpsg_train", {"split": "train"}, [("circle", "far from", "hexagon")]
)


def _state(module, part):
    return {k: v.clone() for k, v in getattr(module.backbone, part).state_dict().items()}


def test_checkpoint_records_stage1_weights_and_eval_loads_them(tmp_path, make_cfg):
    cfg = _cfg(make_cfg)
    s1 = _stage1_file(tmp_path / "s1.safetensors", cfg, seed=1, record=CLOSED_RECORD)
    cfg.MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS = s1
    trained = Holder(cfg)
    SafetensorsCheckpointer(trained, str(tmp_path / "out")).save("model_final")
    ckpt = str(tmp_path / "out" / "model_final.safetensors")
    record = json.loads(read_metadata(ckpt)[CALIBRATION_KEY])
    assert record["mode"] == "calibrated" and record["path"] == os.path.abspath(s1)
    assert record["sha256"] == file_sha256(s1) and record["stage1"] == CLOSED_RECORD

    # --eval-only / demo with a config that names no stage-1 weights: taken from the record
    bare = cfg.clone()
    bare.MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS = ""
    resolved = resolve_calibrated_weights(bare, ckpt)
    assert resolved.MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS == os.path.abspath(s1)
    loaded = Holder(resolved)
    SafetensorsCheckpointer(loaded).load(ckpt)
    for part in ("unet", "implicit_text", "projections"):
        want, got = _state(trained, part), _state(loaded, part)
        assert all(torch.equal(want[k], got[k]) for k in want), part
    assert has_lora(loaded.backbone.unet)

    # a model built without the calibrated weights is refused, naming both sides
    with pytest.raises(ValueError, match=r"model_final.safetensors was trained with calibration "):
        SafetensorsCheckpointer(Holder(bare)).load(ckpt)


def test_mismatched_or_missing_stage1_weights_are_refused(tmp_path, make_cfg):
    cfg = _cfg(make_cfg)
    s1 = _stage1_file(tmp_path / "s1.safetensors", cfg, seed=1, record=CLOSED_RECORD)
    other = _stage1_file(tmp_path / "other.safetensors", cfg, seed=2, record=CLOSED_RECORD)
    cfg.MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS = s1
    SafetensorsCheckpointer(Holder(cfg), str(tmp_path)).save("model_final")
    ckpt = str(tmp_path / "model_final.safetensors")

    named_other = cfg.clone()
    named_other.MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS = other
    with pytest.raises(ValueError, match=r"s1.safetensors \(sha256 .*other.safetensors has sha"):
        resolve_calibrated_weights(named_other, ckpt)
    with pytest.raises(ValueError, match=r"s1.safetensors .*CALIBRATED_WEIGHTS is .*other"):
        SafetensorsCheckpointer(Holder(named_other)).load(ckpt)

    bare = cfg.clone()
    bare.MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS = ""
    shutil.move(s1, str(tmp_path / "moved.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"model_final.safetensors .*s1.safetensors"):
        resolve_calibrated_weights(bare, ckpt)
    shutil.copy(other, s1)  # same path, other content
    with pytest.raises(ValueError, match=r"trained on calibrated weights .*s1.safetensors"):
        resolve_calibrated_weights(bare, ckpt)


def test_checkpoint_without_record_or_missing_keys_needs_opt_in(tmp_path, make_cfg):
    cfg = _cfg(make_cfg)
    model = Holder(cfg)
    ckpt = str(tmp_path / "old.safetensors")
    from safetensors.torch import save_file

    from spade.engine.checkpoint import trainable_state_dict

    save_file(trainable_state_dict(model), ckpt, metadata={"format": "spade"})  # no record
    with pytest.raises(ValueError, match="old.safetensors: metadata 'spade_calibration'"):
        SafetensorsCheckpointer(Holder(cfg)).load(ckpt)
    SafetensorsCheckpointer(Holder(cfg), allow_partial=True).load(ckpt)  # explicit opt-in

    SafetensorsCheckpointer(model, str(tmp_path)).save("full")
    model.extra = nn.Linear(3, 3)  # the checkpoint now misses trainable keys of the model
    with pytest.raises(ValueError, match=r"full.safetensors does not fit the model: .*extra"):
        SafetensorsCheckpointer(model).load(str(tmp_path / "full.safetensors"))
    SafetensorsCheckpointer(model, allow_partial=True).load(str(tmp_path / "full.safetensors"))


def test_no_calibration_ablation_has_no_lora_and_an_untrained_adapter(tmp_path, make_cfg):
    cfg = _cfg(make_cfg)
    cfg.CALIBRATION.ENABLED = False
    backbone = DiffusionBackbone(cfg)
    assert not has_lora(backbone.unet)
    assert not any(p.requires_grad for p in backbone.unet.parameters())
    fresh = build_implicit_text_encoder(
        cfg, build_clip(cfg), backbone.unet.config.cross_attention_dim, seed=0
    )
    seeded = fresh.adapter.state_dict()
    assert all(
        torch.equal(v, seeded[k]) for k, v in backbone.implicit_text.adapter.state_dict().items()
    )
    assert backbone.calibration == {"mode": "disabled"}

    calibrated = _cfg(make_cfg)
    calibrated.MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS = _stage1_file(
        tmp_path / "s1.safetensors", calibrated, seed=1, record=CLOSED_RECORD
    )
    with_lora = DiffusionBackbone(calibrated)
    assert has_lora(with_lora.unet)
    adapter = with_lora.implicit_text.adapter.state_dict()
    assert not all(torch.equal(v, seeded[k]) for k, v in adapter.items())

    both = calibrated.clone()
    both.CALIBRATION.ENABLED = False
    with pytest.raises(ValueError, match="CALIBRATION.ENABLED is False .*CALIBRATED_WEIGHTS"):
        DiffusionBackbone(both)
    # a checkpoint of the ablation evaluated with the default config: ENABLED False from its record
    SafetensorsCheckpointer(Holder(cfg), str(tmp_path)).save("ablation")
    default = _cfg(make_cfg)
    resolved = resolve_calibrated_weights(default, str(tmp_path / "ablation.safetensors"))
    assert resolved.CALIBRATION.ENABLED is False


@pytest.fixture
def ov_datasets():
    names = {}
    for setting in ("ovr", "ovd", "ovdr"):
        names[setting] = f"t_prov_train_{setting}"
        MetadataCatalog.get(names[setting]).set(ov_split=ov_setting_split(OV_SPLIT, setting))
    yield names
    for name in names.values():
        MetadataCatalog.remove(name)


def test_stage2_refuses_calibration_that_leaks_novel_names(tmp_path, make_cfg, ov_datasets):
    cfg = _cfg(make_cfg)
    ovr_meta = MetadataCatalog.get(ov_datasets["ovr"])
    ovr_record = stage1_record(ov_datasets["ovr"], ovr_meta, [("hexagon", "left of", "circle")])
    files = {
        "closed": _stage1_file(tmp_path / "closed.safetensors", cfg, 1, CLOSED_RECORD),
        "ovr": _stage1_file(tmp_path / "ovr.safetensors", cfg, 1, ovr_record),
        "none": _stage1_file(tmp_path / "norecord.safetensors", cfg, 1, None),
    }

    def build(weights, dataset):
        c = cfg.clone()
        c.MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS = files[weights]
        c.DATASETS.TRAIN = (dataset,)
        return DiffusionBackbone(c)

    build("ovr", ov_datasets["ovr"])  # calibrated on the setting's own training data
    build("closed", "synthpsg_train")  # closed-set stage 2: nothing can leak
    with pytest.raises(ValueError, match=r"closed.safetensors: stage 1 .*'synthpsg_train'.*far"):
        build("closed", ov_datasets["ovr"])
    with pytest.raises(ValueError, match=r"ovr.safetensors: .*diamond.*t_prov_train_ovdr"):
        build("ovr", ov_datasets["ovdr"])  # OvR holds out no object class
    with pytest.raises(ValueError, match=r"norecord.safetensors: the file records no stage-1"):
        build("none", ov_datasets["ovd"])
