"""SPADE's fixed open-vocabulary split of PSG: reproducible from its rule, disjoint, complete."""

import json
import os
import subprocess
import sys

from spade.data.datasets.builtin import PSG_CLASSES, PSG_OV_SPLIT_FILE
from spade.data.datasets.psg import load_ov_split

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_committed_split_is_what_the_rule_writes(tmp_path):
    out = tmp_path / "split.json"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "datasets", "make_psg_ov_split.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    with open(PSG_OV_SPLIT_FILE, "rb") as f:
        assert out.read_bytes() == f.read()


def test_split_partitions_the_psg_vocabularies():
    split = load_ov_split(PSG_OV_SPLIT_FILE)
    objects = PSG_CLASSES["thing_classes"] + PSG_CLASSES["stuff_classes"]
    assert sorted(split["base_objects"] + split["novel_objects"]) == sorted(objects)
    assert not set(split["base_objects"]) & set(split["novel_objects"])
    preds = PSG_CLASSES["predicate_classes"]
    assert sorted(split["base_predicates"] + split["novel_predicates"]) == sorted(preds)
    assert (len(split["novel_predicates"]), len(split["base_predicates"])) == (14, 42)
    # the rule: every 4th name of the alphabetically sorted predicates is novel
    assert sorted(split["novel_predicates"]) == sorted(preds)[3::4]
    assert "rule" in json.load(open(PSG_OV_SPLIT_FILE))
