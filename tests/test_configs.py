"""Every shipped YAML config merges onto add_spade_config (no unknown or misspelled key)."""

import glob
import os

import pytest
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
