"""Your own PSG-format dataset: datasets/README.md's examples work as written, and
``DATASETS.CUSTOM`` trains train_net.py on custom class / predicate lists from a config alone."""

import json
import os
import re
import subprocess
import sys

import pytest
from data_helpers import standard_record, write_dataset
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from spade.config import add_spade_config
from spade.data.datasets.custom import custom_dataset_names, register_custom_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "datasets", "README.md")
TRAIN_NET = os.path.join(ROOT, "projects", "SPADE", "train_net.py")
INSTANT = os.path.join(ROOT, "configs", "quick_schedules", "spade_instant_test.yaml")
# class and predicate lists unlike SynthPSG's (things first, then stuff; category ids 0, 1, 2)
CLASSES = {
    "thing_classes": ["kettle", "mug"],
    "stuff_classes": ["countertop"],
    "predicate_classes": ["beside", "left of", "right of", "on"],
}


def _readme_block(after: str, lang: str) -> str:
    """The first ```lang block of datasets/README.md after the line containing ``after``."""
    with open(README) as f:
        text = f.read()
    start = text.index(after)
    return re.search(rf"```{lang}\n(.*?)```", text[start:], re.S).group(1)


def _write_my_dataset(path) -> None:
    """README's layout under ``path``: psg.json, images/, panoptic/, ov_split.json."""
    records = [
        standard_record("a", [[0, 1, 1], [1, 0, 2], [0, 2, 0]]),
        standard_record("b", [[0, 2, 3], [1, 2, 3]]),
        standard_record("c", [[0, 1, 0]]),
        standard_record("d", [[1, 0, 0]]),
    ]
    write_dataset(
        str(path),
        records,
        test_ids=["d"],
        val_ids=["c"],
        classes=CLASSES,
        image_root=str(path / "images"),
        seg_root=str(path / "panoptic"),
    )
    split = {
        "base_objects": ["kettle", "countertop"],
        "novel_objects": ["mug"],
        "base_predicates": ["beside", "left of", "right of"],
        "novel_predicates": ["on"],
    }
    (path / "ov_split.json").write_text(json.dumps(split))


@pytest.fixture
def unregister():
    names = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, unregister):
    _write_my_dataset(tmp_path / "path")
    monkeypatch.chdir(tmp_path)  # the example's relative "path/..." names
    unregister.append("my_train")
    exec(_readme_block("**From Python**", "python"), {})
    meta = MetadataCatalog.get("my_train")
    assert meta.thing_classes == ["kettle", "mug"] and meta.predicate_classes[0] == "beside"
    assert meta.ov_split["novel_predicates"] == ["on"]
    # training drops the novel "mug" with its relations and the novel predicate "on": image "b"
    # keeps no relation and leaves the split; "a" keeps "kettle beside countertop"
    (a,) = DatasetCatalog.get("my_train")
    assert a["image_id"] == "a" and len(a["relations"]) == 1 and a["relations"][0][2] == 0


def _cfg(**custom):
    cfg = get_cfg()
    add_spade_config(cfg)
    for key, value in custom.items():
        cfg.DATASETS.CUSTOM[key] = value
    return cfg


def test_config_node_registers_the_splits(tmp_path, unregister):
    path = tmp_path / "path"
    _write_my_dataset(path)
    assert register_custom_dataset(_cfg()) == []  # NAME "" registers nothing
    files = dict(
        JSON_FILE=str(path / "psg.json"),
        IMAGE_ROOT=str(path / "images"),
        PANOPTIC_ROOT=str(path / "panoptic"),
    )
    names = register_custom_dataset(_cfg(NAME="my_psg", **files))
    unregister.extend(custom_dataset_names("my_psg", with_ov=True))
    assert names == ["my_psg_train", "my_psg_val", "my_psg_test"]
    assert [d["image_id"] for d in DatasetCatalog.get("my_psg_val")] == ["c"]
    assert [d["image_id"] for d in DatasetCatalog.get("my_psg_test")] == ["d"]
    assert MetadataCatalog.get("my_psg_train").stuff_classes == ["countertop"]
    # registering again (every process, every setup_cfg) replaces, with the _ov variants
    cfg = _cfg(NAME="my_psg", OV_SPLIT=str(path / "ov_split.json"), **files)
    names = register_custom_dataset(cfg)
    assert names[3:] == ["my_psg_train_ov", "my_psg_val_ov", "my_psg_test_ov"]
    assert MetadataCatalog.get("my_psg_train_ov").ov_split["novel_objects"] == ["mug"]


@pytest.mark.parametrize(
    "custom, message",
    [
        (dict(NAME="x", IMAGE_ROOT="i", PANOPTIC_ROOT="p"), "DATASETS.CUSTOM.JSON_FILE is empty"),
        (dict(NAME="x", JSON_FILE="j", PANOPTIC_ROOT="p"), "DATASETS.CUSTOM.IMAGE_ROOT is empty"),
        (dict(NAME="psg", JSON_FILE="j", IMAGE_ROOT="i", PANOPTIC_ROOT="p"), "built-in"),
        (dict(NAME="x", JSON_FILE="no/psg.json", IMAGE_ROOT="i", PANOPTIC_ROOT="p"), "psg.json"),
    ],
)
def test_config_node_errors_name_the_key_or_file(custom, message):
    with pytest.raises((ValueError, OSError), match=re.escape(message)):
        register_custom_dataset(_cfg(**custom))


def test_train_net_trains_a_custom_dataset_from_a_config_alone(tmp_path):
    """2 iterations of the instant config on the tiny dataset, configured only by README's YAML."""
    path = tmp_path / "path"
    _write_my_dataset(path)
    block = _readme_block("**From a config alone**", "yaml").replace('"path/', f'"{path}/')
    config = tmp_path / "my_config.yaml"
    config.write_text(f'_BASE_: "{INSTANT}"\n{block}')
    out = tmp_path / "out"
    opts = {
        "OUTPUT_DIR": str(out),
        "SOLVER.MAX_ITER": "2",
        "SOLVER.CHECKPOINT_PERIOD": "2",
        "SOLVER.IMS_PER_BATCH": "2",
        "MODEL.SPADE.MASK_HEAD.NUM_OBJECT_QUERIES": "8",
        "MODEL.SPADE.MASK_HEAD.DEC_LAYERS": "2",
        "MODEL.SPADE.MASK_HEAD.TRAIN_NUM_POINTS": "128",
        "MODEL.SPADE.RELATION.NUM_PAIRS": "16",
    }
    cmd = [sys.executable, TRAIN_NET, "--config-file", str(config)]
    cmd += [x for kv in opts.items() for x in kv]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (out / "model_final.safetensors").is_file()
    with open(out / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    assert any(r["iteration"] == 1 and "loss_rel" in r for r in rows)  # both iterations ran
    # evaluated on the custom validation split, per predicate of the custom list
    assert (out / "inference" / "my_psg_val").is_dir()
    assert any("psg/R@100-beside" in r for r in rows)
