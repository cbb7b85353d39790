"""Built-in registrations: psg_* and vg150_* appear only when their files exist."""

import os

import pytest
from data_helpers import standard_record, write_dataset, write_vg
from detectron2.data import DatasetCatalog, MetadataCatalog

from spade.data.datasets.builtin import PSG_CLASSES, register_all_psg, register_all_vg150

PSG_NAMES = ["psg_train", "psg_val", "psg_test"]
VG_NAMES = [f"vg150_{s}{ov}" for s in ("train", "val", "test") for ov in ("", "_ov")]


@pytest.fixture
def clean_env(monkeypatch):
    for var in (
        "SPADE_PSG_JSON",
        "SPADE_PSG_IMAGE_ROOT",
        "SPADE_PSG_SEG_ROOT",
        "SPADE_PSG_OV_SPLIT",
        "SPADE_VG_ROOT",
    ):
        monkeypatch.delenv(var, raising=False)
    yield
    for name in PSG_NAMES + VG_NAMES:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_absent_data_registers_nothing(tmp_path, clean_env):
    register_all_psg(str(tmp_path))
    register_all_vg150(str(tmp_path))
    assert not set(PSG_NAMES + VG_NAMES) & set(DatasetCatalog.list())


def test_psg_standard_layout(tmp_path, clean_env):
    coco = str(tmp_path / "coco")
    records = [standard_record("1", [[0, 1, 3]]), standard_record("2", [[1, 0, 0]])]
    json_file = write_dataset(coco, records, test_ids=["2"], classes=PSG_CLASSES)
    os.makedirs(tmp_path / "psg")
    os.replace(json_file, tmp_path / "psg" / "psg.json")
    register_all_psg(str(tmp_path))
    assert len(PSG_CLASSES["thing_classes"]) == 80 and len(PSG_CLASSES["stuff_classes"]) == 53
    assert len(PSG_CLASSES["predicate_classes"]) == 56
    assert [d["image_id"] for d in DatasetCatalog.get("psg_train")] == ["1"]
    test = DatasetCatalog.get("psg_test")
    assert test[0]["file_name"] == os.path.join(coco, "img/2.png")
    assert MetadataCatalog.get("psg_test").predicate_flip_map == []  # PSG has no left/right pair


def test_psg_file_with_other_classes_is_rejected(tmp_path, clean_env):
    write_dataset(str(tmp_path / "psg"), [standard_record("1", [[0, 1, 0]])], test_ids=[])
    register_all_psg(str(tmp_path))
    with pytest.raises(ValueError, match="psg.json: field 'thing_classes' differs"):
        DatasetCatalog.get("psg_train")


def test_vg150_standard_layout(tmp_path, clean_env):
    os.makedirs(tmp_path / "vg")
    files = write_vg(tmp_path / "vg")
    os.replace(files[0], tmp_path / "vg" / "VG-SGG-with-attri.h5")
    os.replace(files[1], tmp_path / "vg" / "VG-SGG-dicts-with-attri.json")
    register_all_vg150(str(tmp_path))
    assert set(VG_NAMES) <= set(DatasetCatalog.list())
    assert MetadataCatalog.get("vg150_train_ov").ov_split["novel_objects"][0] == "bed"
    assert [d["image_id"] for d in DatasetCatalog.get("vg150_test")] == ["13"]
