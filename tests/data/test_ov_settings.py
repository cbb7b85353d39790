"""Open-vocabulary settings OvR / OvD / OvD+R: split files, registered names, and no novel name
in any training record, training vocabulary or teacher prompt, per setting (SynthPSG)."""

import json

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from diffusers import DDIMScheduler

from spade.calibration.builder import calibration_items, novel_names
from spade.calibration.teacher import TeacherMapGenerator
from spade.config import add_spade_config
from spade.data.datasets import all_class_names, load_ov_split
from spade.data.datasets.builtin import PSG_OV_SPLIT_FILE
from spade.data.datasets.ov_settings import OV_SETTINGS, ov_setting_file, ov_setting_split
from spade.data.datasets.synthetic import register_synthpsg, synthpsg_dataset_names
from spade.data.datasets.vg import VG150_OV_SPLIT_FILE
from spade.data.synthpsg import OV_SPLIT
from spade.modeling.meta_arch.vocabulary import base_vocabulary, vocabulary_from_metadata

COMBINED = {
    "psg": lambda: load_ov_split(PSG_OV_SPLIT_FILE),
    "vg150": lambda: load_ov_split(VG150_OV_SPLIT_FILE),
    "synthpsg": lambda: dict(OV_SPLIT),
}


@pytest.mark.parametrize("dataset", sorted(COMBINED))
def test_shipped_setting_files_equal_the_derivation(dataset):
    combined = COMBINED[dataset]()
    for setting in OV_SETTINGS:
        with open(ov_setting_file(dataset, setting)) as f:
            shipped = json.load(f)
        derived = ov_setting_split(combined, setting)
        assert {k: shipped[k] for k in derived} == derived
        assert load_ov_split(ov_setting_file(dataset, setting)) == derived
    ovr, ovd = ov_setting_split(combined, "ovr"), ov_setting_split(combined, "ovd")
    # OvR: predicates only; OvD: objects only; OvD+R: both (the combined split)
    assert not ovr["novel_objects"] and ovr["novel_predicates"] == combined["novel_predicates"]
    assert not ovd["novel_predicates"] and ovd["novel_objects"] == combined["novel_objects"]
    assert sorted(ovr["base_objects"]) == sorted(
        combined["base_objects"] + combined["novel_objects"]
    )
    with pytest.raises(ValueError, match="unknown open-vocabulary setting 'ovx'"):
        ov_setting_split(combined, "ovx")


def _cfg():
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.CALIBRATION.MAX_TRIPLETS_PER_IMAGE = 8
    return cfg


def _teacher_prompts(items):
    """The prompts the stage-1 teacher builds for ``items`` (no model runs)."""
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False)
    gen = TeacherMapGenerator(
        unet=None,
        vae=None,
        latent_scale=1.0,
        scheduler=scheduler,
        encode_text=None,
        encode_ids=None,
        context_length=77,
        num_steps=2,
    )
    return [p for _, triplets in items for p in gen.prompts(triplets)]


@pytest.fixture
def registered(synth_root):
    register_synthpsg(synth_root, prefix="t_ovs")
    yield "t_ovs"
    for n in synthpsg_dataset_names("t_ovs"):
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


@pytest.mark.parametrize("setting", sorted(OV_SETTINGS))
def test_no_novel_name_reaches_training(registered, setting):
    name = f"{registered}_train_{setting}"
    meta = MetadataCatalog.get(name)
    split = meta.ov_split
    assert split == ov_setting_split(OV_SPLIT, setting)
    novel_objects, novel_predicates = set(split["novel_objects"]), set(split["novel_predicates"])
    assert novel_objects or novel_predicates
    classes, predicates = all_class_names(meta), list(meta.predicate_classes)
    # training records
    dicts = DatasetCatalog.get(name)
    assert dicts
    used_classes = {classes[s["category_id"]] for d in dicts for s in d["segments_info"]}
    used_preds = {predicates[r[2]] for d in dicts for r in d["relations"]}
    assert not used_classes & novel_objects and not used_preds & novel_predicates
    # the other kind stays closed-set: every class / predicate of the vocabulary may train
    if setting == "ovr":
        assert not novel_objects and {"diamond", "hexagon"} <= used_classes
    if setting == "ovd":
        assert not novel_predicates and "far from" in used_preds
    # training vocabulary
    vocab = base_vocabulary(vocabulary_from_metadata(name), split)
    assert not set(vocab.class_names) & novel_objects
    assert not set(vocab.predicate_names) & novel_predicates
    # teacher prompts of stage 1 calibrating on this setting's training data
    items = calibration_items(_cfg(), name)
    prompts = _teacher_prompts(items)
    assert prompts
    for novel in novel_objects | novel_predicates:
        assert not any(novel in p for p in prompts), (novel, setting)
    # stage 1's held-out L_cal reads the val split with the training set's novel names left out
    # (CalibrationTrainer: exclude_names=novel_names(DATASETS.TRAIN[0]))
    assert novel_names(name) == sorted(novel_objects | novel_predicates)
    val = f"{registered}_val"
    held_out = calibration_items(_cfg(), val, exclude_names=novel_names(name))
    held_prompts = _teacher_prompts(held_out)
    assert held_prompts
    for novel in novel_objects | novel_predicates:
        assert not any(novel in p for p in held_prompts), (novel, setting)
    unfiltered = _teacher_prompts(calibration_items(_cfg(), val))
    assert any(n in p for p in unfiltered for n in novel_objects | novel_predicates)
    # held-out splits are not filtered; _ov stands for OvD+R
    assert len(DatasetCatalog.get(f"{registered}_test_{setting}")) == len(
        DatasetCatalog.get(f"{registered}_test")
    )
    assert MetadataCatalog.get(f"{registered}_train_ov").ov_split == ov_setting_split(
        OV_SPLIT, "ovdr"
    )


def test_closed_set_training_prompts_do_name_novel_classes(registered):
    """The control: without a setting, the novel names do reach the teacher prompts."""
    prompts = _teacher_prompts(calibration_items(_cfg(), f"{registered}_train"))
    assert any("far from" in p for p in prompts) and any("hexagon" in p for p in prompts)
