"""VG150 loading on tiny h5 / json files: boxes, splits, duplicates, open vocabulary, errors."""

import h5py
import pytest
from data_helpers import write_vg
from detectron2.data import DatasetCatalog, MetadataCatalog

from spade.data.datasets import VG150_OV_SPLIT_FILE, load_ov_split, load_vg150, register_vg150


def test_boxes_splits_and_duplicates(tmp_path):
    files = write_vg(tmp_path)
    train = load_vg150(*files, "/imgs", "train", num_val=0)
    assert [d["image_id"] for d in train] == ["10", "11"]  # 12 has no relations
    d = train[0]
    assert d["file_name"] == "/imgs/10.jpg" and d["pan_seg_file_name"] is None
    # (cx, cy, w, h) = (512, 256, 512, 256) at scale 1024 of a 200-wide image -> [50, 25, 150, 75]
    assert d["segments_info"][0]["bbox"] == [50.0, 25.0, 150.0, 75.0]
    assert d["segments_info"][0]["area"] == 5000
    assert [s["category_id"] for s in d["segments_info"]] == [0, 1]
    assert d["relations"] == [[0, 1, 0]]  # exact duplicate removed
    test = load_vg150(*files, "/imgs", "test")
    assert [d["image_id"] for d in test] == ["13"]  # 14 has no boxes
    assert test[0]["relations"] == [[0, 1, 0], [1, 0, 1]]
    val = load_vg150(*files, "/imgs", "val", num_val=1)
    assert [d["image_id"] for d in val] == ["10"]
    assert [d["image_id"] for d in load_vg150(*files, "/imgs", "train", num_val=1)] == ["11"]


def test_open_vocabulary_and_registration(tmp_path):
    files = write_vg(tmp_path)
    ov = {
        "base_objects": ["cat", "dog"],
        "novel_objects": ["bed"],
        "base_predicates": ["on"],
        "novel_predicates": ["near"],
    }
    train = load_vg150(*files, "/imgs", "train", ov_split=ov, num_val=0)
    assert [d["image_id"] for d in train] == ["10"]  # image 11's only relation used "bed"/"near"
    assert len(load_vg150(*files, "/imgs", "test", ov_split=ov)[0]["relations"]) == 2
    register_vg150("t_vg_train", *files, "/imgs", "train", ov_split=ov, num_val=0)
    try:
        meta = MetadataCatalog.get("t_vg_train")
        assert (
            meta.box_only
            and meta.stuff_classes == []
            and meta.thing_classes == ["cat", "dog", "bed"]
        )
        assert meta.predicate_classes == ["on", "near"] and meta.ov_split["novel_objects"] == [
            "bed"
        ]
        assert len(DatasetCatalog.get("t_vg_train")) == 1
    finally:
        DatasetCatalog.remove("t_vg_train")
        MetadataCatalog.remove("t_vg_train")
    split = load_ov_split(VG150_OV_SPLIT_FILE)
    assert [
        len(split[k])
        for k in ("base_objects", "novel_objects", "base_predicates", "novel_predicates")
    ] == [105, 45, 35, 15]


@pytest.mark.parametrize(
    "h5, images, pattern",
    [
        (
            {"labels": [[1], [2], [1], [4], [2], [1], [2]]},
            None,
            "image_id 11: labels.3. = 4 is not a known category",
        ),
        (
            {"relationships": [[0, 1], [0, 1], [2, 5], [5, 6], [5, 6], [6, 5]]},
            None,
            r"image_id 11: relationships\[2\] points outside",
        ),
        (
            {"predicates": [[1], [3], [2], [1], [1], [2]]},
            None,
            r"image_id 10: predicates\[1\] = 3 is out of range",
        ),
        (None, [{"image_id": 10, "width": 1, "height": 1}], "1 images .* but .* has 5"),
    ],
)
def test_bad_input(tmp_path, h5, images, pattern):
    files = write_vg(tmp_path, h5, images)
    with pytest.raises(ValueError, match=pattern):
        load_vg150(*files, "/imgs", "train", num_val=0)


def test_missing_dataset_and_file(tmp_path):
    files = write_vg(tmp_path)
    with h5py.File(files[0], "a") as f:
        del f["img_to_last_rel"]
    with pytest.raises(ValueError, match="vg.h5: missing dataset 'img_to_last_rel'"):
        load_vg150(*files, "/imgs", "train")
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        load_vg150(str(tmp_path / "nope.h5"), *files[1:], "/imgs", "train")
