"""Learning-curve PNG from a detectron2 metrics.json (make demo's stage 2)."""

import json

import pytest

from spade.evaluation.report import plot_learning_curve, read_learning_curve


def _write(path, rows, tail=""):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" + tail)


def test_curve_reads_evaluations_only_and_skips_a_torn_last_line(tmp_path):
    metrics = tmp_path / "metrics.json"
    rows = [
        {"iteration": 19, "total_loss": 3.0},
        {"iteration": 249, "psg/R@50": 1.5, "panoptic_seg/PQ": 10.0, "panoptic_seg/PQ_th": 0.0},
        {"iteration": 259, "total_loss": 2.0},
        {"iteration": 499, "psg/R@50": 4.0, "psg/mR@50": 2.0, "panoptic_seg/PQ": 20.0},
    ]
    _write(metrics, rows, tail='{"iteration": 5')  # a killed run's half-written line
    curves = read_learning_curve(str(metrics))
    assert curves["psg/R@50"] == [(250, 1.5), (500, 4.0)]
    assert curves["psg/mR@50"] == [(500, 2.0)]
    assert curves["panoptic_seg/PQ"] == [(250, 10.0), (500, 20.0)]
    assert curves["panoptic_seg/PQ_th"] == [(250, 0.0)]
    out = tmp_path / "curve.png"
    final = {"psg": {"R@50": 9.0}, "panoptic_seg": {"PQ": 30.0}}
    assert plot_learning_curve(str(metrics), str(out), final=final, final_iteration=750)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_curve_without_evaluations_and_bad_lines(tmp_path):
    metrics = tmp_path / "metrics.json"
    _write(metrics, [{"iteration": 19, "total_loss": 3.0}])
    assert plot_learning_curve(str(metrics), str(tmp_path / "none.png")) is None
    assert not (tmp_path / "none.png").exists()
    metrics.write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.json: line 2 is not JSON"):
        read_learning_curve(str(metrics))
