"""The one-pass file evaluator: PQ equal to panopticapi's pq_compute, workers change nothing, the
relation numbers equal the reference loop on the same files, and the command line stays light."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from panopticapi.evaluation import pq_compute
from psg_files import NUM_STUFF, NUM_THINGS, write_psg_case
from psg_reference import reference_from_files

from spade.evaluation.psg_evaluation import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module", params=[0, 1])
def case(request, tmp_path_factory):
    root = str(tmp_path_factory.mktemp(f"psg_case{request.param}"))
    return write_psg_case(root, num_images=12, height=60, width=80, seed=request.param, rows=60)


def _score(case, tmp_path, *extra):
    gt_json, seg_root, pred_dir = case
    out = tmp_path / f"scores{len(extra)}.json"
    argv = ["--gt", gt_json, "--seg-root", seg_root, "--pred-dir", pred_dir, "--protocol", "both"]
    assert main(argv + ["--output", str(out), *extra]) == 0
    return json.loads(out.read_text())


def _panopticapi(case, tmp_path):
    """pq_compute on the same files (ground-truth areas from the JSON, first entry per id)."""
    gt_json, seg_root, pred_dir = case
    data = json.load(open(gt_json))
    test_ids = set(data["test_image_ids"])
    images = [d for d in data["data"] if d["image_id"] in test_ids]
    entries = json.load(open(os.path.join(pred_dir, "relation.json")))
    cats = [
        {"id": i, "name": n, "isthing": int(i < NUM_THINGS)}
        for i, n in enumerate(data["thing_classes"] + data["stuff_classes"])
    ]
    gt_anns, pred_anns = [], []
    for d, e in zip(images, entries):
        gt_anns.append(
            {
                "image_id": d["image_id"],
                "file_name": d["pan_seg_file_name"],
                "segments_info": d["segments_info"],
            }
        )
        first = {}
        for s in e["segments_info"]:
            first.setdefault(s["id"], {"id": s["id"], "category_id": s["category_id"] - 1})
        pred_anns.append(
            {
                "image_id": d["image_id"],
                "file_name": e["pan_seg_file_name"],
                "segments_info": list(first.values()),
            }
        )
    (tmp_path / "gt.json").write_text(json.dumps({"categories": cats, "annotations": gt_anns}))
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": pred_anns}))
    return pq_compute(
        str(tmp_path / "gt.json"),
        str(tmp_path / "pred.json"),
        seg_root,
        os.path.join(pred_dir, "panseg"),
    )


def test_pq_equals_panopticapi(case, tmp_path):
    data = json.load(open(case[0]))
    segs = [s for d in data["data"] for s in d["segments_info"]]
    assert any(s["iscrowd"] for s in segs) and min(s["area"] for s in segs) <= 4  # crowd, tiny
    ours = _score(case, tmp_path)["panoptic_seg"]
    ref = _panopticapi(case, tmp_path)
    for suffix, group in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
        for key in ("pq", "sq", "rq"):
            assert ours[key.upper() + suffix] == pytest.approx(100 * ref[group][key], abs=1e-9)
    assert 0 < ours["PQ"] < 100 and ref["All"]["n"] > 20  # matches, misses, many categories
    assert len(data["thing_classes"]) + len(data["stuff_classes"]) == NUM_THINGS + NUM_STUFF


def test_workers_do_not_change_results(case, tmp_path):
    one = _score(case, tmp_path, "--workers", "1")
    two = _score(case, tmp_path, "--workers", "3")
    assert one == two


def test_recall_equals_reference_loop_on_files(case, tmp_path):
    ours = _score(case, tmp_path)["psg"]
    ref = reference_from_files(*case)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert ours["R@100"] > 0


def test_cli_modules_do_not_import_the_model_stack():
    """The CLI's imports pull in neither torch nor detectron2 (the package's own __init__, which
    registers the model, is not loaded here: it belongs to whoever imports ``spade``)."""
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('spade'); pkg.__path__ = [sys.argv[1]]\n"
        "sys.modules['spade'] = pkg\n"
        "import spade.evaluation, spade.evaluation.psg_evaluation\n"
        "heavy = ('torch', 'detectron2', 'diffusers', 'open_clip', 'matplotlib')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code, os.path.join(REPO, "spade")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]" and out.stderr == ""
