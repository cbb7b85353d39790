"""Every shipped YAML config merges onto add_spade_config (no unknown or misspelled key), and a
config sets only what differs from its _BASE_ (or, for a Base file, from the defaults)."""

import glob
import os

import pytest
import yaml
from detectron2.config import get_cfg

from spade.config import add_spade_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    if os.sep + "pretrain" + os.sep
    not in p  # stage-0 configs: tests/pretrain/test_pretrain_config.py
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_merges(path):
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.merge_from_file(path)
    assert cfg.MODEL.SPADE.OPEN_VOCAB.FUSION_ALPHA == pytest.approx(0.34)
    assert cfg.MODEL.SPADE.RELATION.ETA == pytest.approx(0.65)
    assert cfg.MODEL.SPADE.RELATION.RQC_WEIGHT == pytest.approx(0.6)


def test_paper_schedule_of_the_psg_config():
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "psg", "spade_sd15_psg.yaml"))
    # 80 epochs with the LR decay at epoch 60: the decay step is 3/4 of the schedule
    assert cfg.SOLVER.STEPS[0] == pytest.approx(0.75 * cfg.SOLVER.MAX_ITER, abs=1)


def _leaf_keys(node, prefix=()):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value, prefix + (key,))
        else:
            yield prefix + (key,)


def _lookup(cfg, path):
    for key in path:
        cfg = cfg[key]
    return list(cfg) if isinstance(cfg, (list, tuple)) else cfg


def restated_keys(path):
    """Keys of the YAML at ``path`` whose value equals the one its base already gives: the merged
    _BASE_ chain, or get_cfg() + add_spade_config for a Base file. VERSION (detectron2's format
    tag, kept in Base files) is not a setting."""
    with open(path) as f:
        own = yaml.safe_load(f) or {}
    base = get_cfg()
    add_spade_config(base)
    if "_BASE_" in own:
        base.merge_from_file(os.path.join(os.path.dirname(path), own.pop("_BASE_")))
    merged = base.clone()
    merged.merge_from_file(path)
    return [
        ".".join(key)
        for key in _leaf_keys(own)
        if key != ("VERSION",) and _lookup(base, key) == _lookup(merged, key)
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_does_not_restate_its_base(path):
    assert restated_keys(path) == [], "these keys repeat the base's value; delete them"


def test_restated_keys_are_found(tmp_path):
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text(
        f'_BASE_: "{os.path.join(ROOT, "configs", "Base-SPADE.yaml")}"\n'
        "MODEL:\n  SPADE:\n    RELATION:\n      ETA: 0.65\n      KNN: 3\n"
        'DATASETS:\n  TRAIN: ("synthpsg_train",)\n'
    )
    assert restated_keys(str(leaf)) == ["MODEL.SPADE.RELATION.ETA", "DATASETS.TRAIN"]
