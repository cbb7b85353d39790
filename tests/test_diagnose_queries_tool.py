"""tools/diagnose_queries.py as users run it: a fresh process, a registered dataset, JSON + PNG."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTANT = os.path.join(ROOT, "configs", "quick_schedules", "spade_instant_test.yaml")


def test_diagnose_queries_counts_every_ground_truth_segment(tmp_path):
    from spade.data.synthpsg import ensure_synthpsg

    data = tmp_path / "data"
    ensure_synthpsg(str(data), num_images=24, seed=0, size=64)
    out = tmp_path / "diag"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "diagnose_queries.py"),
        "--config-file",
        INSTANT,
        "DATASETS.SYNTHPSG.ROOT",
        str(data),
        "DATASETS.TEST",
        "('synthpsg_val_ovd',)",
        "MODEL.WEIGHTS",
        "",
        "MODEL.SPADE.ALLOW_UNTRAINED",
        "True",
        "OUTPUT_DIR",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out / "query_diagnosis.json"))
    assert result["dataset"] == "synthpsg_val_ovd"
    psg = json.load(open(data / "psg.json"))
    val = [d for d in psg["data"] if d["image_id"] in set(map(str, psg["val_image_ids"]))]
    names = psg["thing_classes"] + psg["stuff_classes"]
    expected = {}
    for d in val:
        for s in d["segments_info"]:
            expected[names[s["category_id"]]] = expected.get(names[s["category_id"]], 0) + 1
    per_class = result["per_class"]
    assert {k: v["count"] for k, v in per_class.items()} == expected
    for v in per_class.values():
        assert 0.0 <= v["proposal_recall"] <= 1.0 and 0.0 <= v["no_object"] <= 1.0
        assert v["named_right"] + v["unmatched"] <= v["count"]
    assert (out / "query_diagnosis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| class | count |" in proc.stdout
    # a config that names no weights and does not allow untrained models is refused clearly
    bad = [a for a in cmd if a not in ("MODEL.SPADE.ALLOW_UNTRAINED", "True")]
    proc = subprocess.run(bad, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "MODEL.SPADE.ALLOW_UNTRAINED" in proc.stderr
