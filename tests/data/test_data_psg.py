"""register_psg: split rules, open-vocabulary filtering, metadata and bad-input errors."""

import json
import os

import pytest
from data_helpers import PREDICATES, STUFF, THINGS, standard_record, write_dataset
from detectron2.data import DatasetCatalog, MetadataCatalog

from spade.data.datasets import all_class_names, load_psg_json, register_psg
from spade.data.datasets.synthetic import register_synthpsg, synthpsg_dataset_names


def _records():
    return [
        standard_record("1", [[0, 1, 0], [1, 0, 1], [0, 2, 2]]),  # train
        standard_record("2", []),  # train, no relations -> dropped
        standard_record("3", [[0, 1, 0], [0, 1, 0], [0, 1, 2]]),  # test, one duplicate
        standard_record("4", []),  # test, no relations -> dropped
        standard_record("5", [[1, 0, 1]]),  # val
    ]


@pytest.fixture
def psg_file(tmp_path):
    return write_dataset(str(tmp_path), _records(), test_ids=["3", "4"], val_ids=["5"])


def _load(path, split, **kw):
    root = os.path.dirname(path)
    return load_psg_json(path, root, root, split, **kw)


def test_split_rules(psg_file, caplog):
    with caplog.at_level("INFO"):
        train = _load(psg_file, "train")
    assert [d["image_id"] for d in train] == ["1"]
    assert "dropped 1 of 2 images without relations" in caplog.text
    test = _load(psg_file, "test")
    assert [d["image_id"] for d in test] == ["3"]
    assert test[0]["relations"] == [[0, 1, 0], [0, 1, 2]]  # duplicate gone, two predicates kept
    assert [d["image_id"] for d in _load(psg_file, "val")] == ["5"]
    assert len(_load(psg_file, "all")) == 5
    d = train[0]
    assert d["file_name"] == os.path.join(os.path.dirname(psg_file), "img/1.png")
    assert [s["isthing"] for s in d["segments_info"]] == [True, True, False]
    assert d["segments_info"][1]["bbox"] == [16.0, 0.0, 24.0, 8.0]


def test_empty_dataset(tmp_path):
    path = write_dataset(str(tmp_path), [], test_ids=[])
    assert all(_load(path, split) == [] for split in ("train", "val", "test", "all"))


def test_val_falls_back_to_test_without_val_ids(tmp_path):
    path = write_dataset(str(tmp_path), _records(), test_ids=["3"])
    assert [d["image_id"] for d in _load(path, "val")] == ["3"]
    assert [d["image_id"] for d in _load(path, "train")] == ["1", "5"]


def test_ov_filter_drops_novel_segments_and_relations(psg_file):
    ov = {
        "base_objects": ["dog", "grass"],
        "novel_objects": ["cat"],
        "base_predicates": ["left of", "on"],
        "novel_predicates": ["right of"],
    }
    train = _load(psg_file, "train", ov_split=ov)
    # image 1: cat (index 0) removed -> dog, grass remain; all relations used cat or "right of"
    assert train == []
    ov["novel_objects"], ov["base_objects"] = ["grass"], ["cat", "dog"]
    train = _load(psg_file, "train", ov_split=ov)
    assert [s["category_id"] for s in train[0]["segments_info"]] == [0, 1]
    assert train[0]["relations"] == [[0, 1, 0]]
    test = _load(psg_file, "test", ov_split=ov)  # test is never filtered
    assert test[0]["relations"] == [[0, 1, 0], [0, 1, 2]]
    ov["novel_objects"] = ["unicorn"]
    with pytest.raises(ValueError, match="unicorn"):
        _load(psg_file, "train", ov_split=ov)


def test_register_sets_metadata_and_writes_panoptic_json(psg_file):
    root = os.path.dirname(psg_file)
    register_psg("t_psg_train", psg_file, root, root, "train", ov_split=None)
    try:
        meta = MetadataCatalog.get("t_psg_train")
        assert all_class_names(meta) == THINGS + STUFF
        assert meta.predicate_classes == PREDICATES and meta.evaluator_type == "psg"
        assert meta.thing_dataset_id_to_contiguous_id == {0: 0, 1: 1}
        assert meta.stuff_dataset_id_to_contiguous_id == {2: 2}
        assert meta.predicate_flip_map == [("left of", "right of")]
        assert len(meta.thing_colors) == 2 and len(meta.stuff_colors) == 1
        assert meta.thing_colors != [meta.stuff_colors[0]] * 2 and not hasattr(meta, "ov_split")
        assert len(DatasetCatalog.get("t_psg_train")) == 1
        with open(meta.panoptic_json) as f:
            pan = json.load(f)
        assert pan["annotations"][0]["file_name"] == "pan/1.png"
        assert [c["isthing"] for c in pan["categories"]] == [1, 1, 0]
    finally:
        DatasetCatalog.remove("t_psg_train")
        MetadataCatalog.remove("t_psg_train")


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (
            lambda p: p.pop("predicate_classes"),
            ValueError,
            "missing top-level field 'predicate_classes'",
        ),
        (
            lambda p: p["data"][1].pop("segments_info"),
            ValueError,
            "image_id 2: missing field 'segments_info'",
        ),
        (
            lambda p: p["data"][0]["relations"].append([0, 3, 0]),
            ValueError,
            r"image_id 1: relations\[3\].*segment index out of range",
        ),
        (
            lambda p: p["data"][0]["relations"].append([0, 1, 3]),
            ValueError,
            "image_id 1: .*predicate index out of range",
        ),
        (
            lambda p: p["data"][2]["segments_info"][0].update(category_id=3),
            ValueError,
            "image_id 3: segments_info.0..category_id 3 is not a known category",
        ),
        (
            lambda p: p["data"][0]["relations"].append([0, 1]),
            ValueError,
            r"image_id 1: relations\[3\] = \[0, 1\] is not \[subject, object, predicate\]",
        ),
        (
            lambda p: p["data"][4]["annotations"].pop(),
            ValueError,
            "image_id 5: annotations has 2 entries for 3 segments_info",
        ),
        (
            lambda p: p["data"][0]["segments_info"][1].update(id=1),
            ValueError,
            r"image_id 1: segments_info\[1\].id 1 is repeated",
        ),
        (
            lambda p: p["data"][0]["segments_info"][0].pop("id"),
            ValueError,
            r"image_id 1: segments_info\[0\] missing field 'id'",
        ),
        (
            lambda p: p["data"][0].update(file_name="img/missing.png"),
            FileNotFoundError,
            "image_id 1: file_name .*missing.png does not exist",
        ),
        (
            lambda p: p["data"][0].update(pan_seg_file_name="pan/missing.png"),
            FileNotFoundError,
            "image_id 1: pan_seg_file_name .*missing.png",
        ),
    ],
)
def test_bad_input_names_file_image_and_field(psg_file, mutate, error, pattern):
    with open(psg_file) as f:
        psg = json.load(f)
    mutate(psg)
    with open(psg_file, "w") as f:
        json.dump(psg, f)
    with pytest.raises(error, match=pattern) as info:
        _load(psg_file, "train")
    assert psg_file in str(info.value)


def test_missing_file_and_class_mismatch(tmp_path, psg_file):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        _load(str(tmp_path / "nope.json"), "train")
    with pytest.raises(ValueError, match="unknown split"):
        _load(psg_file, "training")
    root = os.path.dirname(psg_file)
    classes = {
        "thing_classes": ["cat", "cow"],
        "stuff_classes": STUFF,
        "predicate_classes": PREDICATES,
    }
    register_psg("t_psg_mismatch", psg_file, root, root, "train", classes=classes)
    try:
        with pytest.raises(ValueError, match="'thing_classes' differs"):
            DatasetCatalog.get("t_psg_mismatch")
    finally:
        DatasetCatalog.remove("t_psg_mismatch")
        MetadataCatalog.remove("t_psg_mismatch")


def test_synthpsg_registration(tmp_path, synth_root):
    register_synthpsg(str(tmp_path / "absent"), prefix="t_synth")
    names = synthpsg_dataset_names("t_synth")
    try:
        with pytest.raises(FileNotFoundError, match="make_synthetic_psg.py --out"):
            DatasetCatalog.get("t_synth_train")
        register_synthpsg(synth_root, prefix="t_synth")  # re-registration replaces the old root
        train, val, test = (DatasetCatalog.get(f"t_synth_{s}") for s in ("train", "val", "test"))
        assert len(train) + len(val) + len(test) == 30 and len(test) == 6 and len(val) == 3
        ov = DatasetCatalog.get("t_synth_train_ov")
        meta = MetadataCatalog.get("t_synth_train_ov")
        novel_c = {all_class_names(meta).index(n) for n in meta.ov_split["novel_objects"]}
        novel_p = {meta.predicate_classes.index(n) for n in meta.ov_split["novel_predicates"]}
        assert ov and all(s["category_id"] not in novel_c for d in ov for s in d["segments_info"])
        assert all(r[2] not in novel_p for d in ov for r in d["relations"])
        assert len(DatasetCatalog.get("t_synth_test_ov")) == len(test)
    finally:
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)
