"""The ablation study driver: cache keys, verdicts, and a quick-mode run of two rows."""

import math
import os
import re
import subprocess
import sys

import pytest

from spade.ablation.runs import Run, run_dir, run_key
from spade.ablation.study import SCHEDULES, all_runs, build_tables, metric
from spade.ablation.verdict import REPRODUCED, REVERSED, WITHIN_NOISE, seed_stats, verdict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGE2 = "configs/synthetic/spade_tiny_synthpsg.yaml"
STAGE1 = "configs/calibration/SynthPSG-Tiny.yaml"


# ---------------------------------------------------------------- cache key


def test_key_is_stable_and_ignores_output_dir_and_root(tmp_path):
    a = Run("stage2", STAGE2, ("SOLVER.MAX_ITER", "7"))
    assert run_key(a, str(tmp_path / "x")) == run_key(
        Run("stage2", STAGE2, ("SOLVER.MAX_ITER", "7")), str(tmp_path / "y")
    )
    # OUTPUT_DIR is where the run goes, not what it computes
    b = Run("stage2", STAGE2, ("SOLVER.MAX_ITER", "7", "OUTPUT_DIR", "/elsewhere"))
    assert run_key(a, str(tmp_path)) == run_key(b, str(tmp_path))
    # a path under the study root is written relative to it
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    k1 = run_key(Run("stage2", STAGE2, ("DATASETS.SYNTHPSG.ROOT", str(r1 / "data"))), str(r1))
    k2 = run_key(Run("stage2", STAGE2, ("DATASETS.SYNTHPSG.ROOT", str(r2 / "data"))), str(r2))
    assert k1 == k2


def test_key_changes_with_any_config_value_and_not_otherwise(tmp_path):
    root = str(tmp_path)
    base = run_key(Run("stage2", STAGE2), root)
    # the config's own value given again: the same config, the same key
    from detectron2.config import get_cfg

    from spade.config import add_spade_config

    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, STAGE2))
    own = str(cfg.SOLVER.MAX_ITER)
    assert run_key(Run("stage2", STAGE2, ("SOLVER.MAX_ITER", own)), root) == base
    # the order of independent opts does not matter
    ab = ("SOLVER.MAX_ITER", "9", "SEED", "3")
    assert run_key(Run("stage2", STAGE2, ab), root) == run_key(
        Run("stage2", STAGE2, ab[2:] + ab[:2]), root
    )
    changed = {
        run_key(Run("stage2", STAGE2, (k, v)), root)
        for k, v in [
            ("SOLVER.MAX_ITER", str(int(own) + 1)),
            ("SEED", "1"),
            ("MODEL.SPADE.RELATION.ETA", "0.6"),
            ("MODEL.SPADE.RELATION.FUSION_ALPHA", "0.0"),
            ("DATALOADER.NUM_WORKERS", "1"),
            ("INPUT.IMAGE_SIZE", "96"),
        ]
    }
    assert len(changed) == 6 and base not in changed
    # the kind and the parent are part of the key; a changed stage 1 changes its stage 2
    assert run_key(Run("stage1", STAGE1), root) != run_key(Run("stage2", STAGE1), root)
    s1a, s1b = Run("stage1", STAGE1), Run("stage1", STAGE1, ("SEED", "5"))
    k_a = run_key(Run("stage2", STAGE2, (), s1a), root)
    k_b = run_key(Run("stage2", STAGE2, (), s1b), root)
    assert k_a != k_b and base not in (k_a, k_b)
    assert os.path.basename(run_dir(Run("stage2", STAGE2), root)) == f"stage2-{base[:16]}"


def test_key_changes_with_the_shipped_weights_under_the_same_path(tmp_path):
    models = tmp_path / "sd"
    (models / "unet").mkdir(parents=True)
    manifest = models / "unet" / "spade_manifest.json"
    manifest.write_text('{"sha256": "aaa"}')
    run = Run("stage2", STAGE2, ("MODEL.SPADE.DIFFUSION.PRETRAINED", str(models)))
    first = run_key(run, str(tmp_path / "a"))
    manifest.write_text('{"sha256": "bbb"}')
    assert run_key(run, str(tmp_path / "b")) != first


def test_an_evaluation_loads_its_models_stage_one(tmp_path):
    from spade.ablation.runs import _wired_opts

    root = str(tmp_path)
    s1 = Run("stage1", STAGE1)
    s2 = Run("stage2", "configs/synthetic/spade_tiny_synthpsg_ovr.yaml", ("SEED", "1"), s1)
    ev = Run("eval", s2.config_file, s2.opts + ("MODEL.SPADE.RELATION.FUSION_ALPHA", "0.0"), s2)
    opts = _wired_opts(ev, root)
    pairs = dict(zip(opts[::2], opts[1::2]))
    assert pairs["MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS"] == os.path.join(
        run_dir(s1, root), "model_final.safetensors"
    )
    assert pairs["MODEL.WEIGHTS"] == os.path.join(run_dir(s2, root), "model_final.safetensors")
    assert pairs["MODEL.SPADE.RELATION.FUSION_ALPHA"] == "0.0"


def test_bad_runs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        Run("stage3", STAGE2)
    with pytest.raises(ValueError, match="KEY VALUE"):
        Run("stage2", STAGE2, ("SEED",))
    with pytest.raises(ValueError, match="parent"):
        Run("eval", STAGE2)
    with pytest.raises(ValueError, match="SOLVER.NOPE"):
        run_key(Run("stage2", STAGE2, ("SOLVER.NOPE", "1")), str(tmp_path))


# ---------------------------------------------------------------- verdicts


def test_seed_stats_by_hand():
    s = seed_stats([1.0, 2.0, 6.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(3.0)
    assert s["std"] == pytest.approx(math.sqrt((4 + 1 + 9) / 2))
    s = seed_stats([None, float("nan"), 4.0])
    assert s == {"mean": 4.0, "std": s["std"], "n": 1} and math.isnan(s["std"])
    assert seed_stats([])["n"] == 0


def test_verdict_by_hand():
    # means 12 and 10, stds 1 and 1, n 3: se = sqrt(2/3) = 0.816, 2 se = 1.63 < 2
    v = verdict([11, 12, 13], [9, 10, 11])
    assert v["verdict"] == REPRODUCED and v["diff"] == pytest.approx(2.0)
    assert v["se"] == pytest.approx(math.sqrt(2 / 3))
    assert verdict([9, 10, 11], [11, 12, 13])["verdict"] == REVERSED
    # the paper's direction is "lower" (e.g. an ablated row vs the full method)
    assert verdict([9, 10, 11], [11, 12, 13], expect_higher=False)["verdict"] == REPRODUCED
    # spread larger than the gap: stds 3, se = sqrt(6) = 2.45, 2 se = 4.9 > 2
    assert verdict([9, 12, 15], [7, 10, 13])["verdict"] == WITHIN_NOISE
    # no spread but a gap below the 0.5-point floor
    assert verdict([10.3, 10.3, 10.3], [10.0, 10.0, 10.0])["verdict"] == WITHIN_NOISE
    assert verdict([10.6, 10.6], [10.0, 10.0])["verdict"] == REPRODUCED
    # one seed: no spread can be estimated
    one = verdict([50.0], [10.0])
    assert one["verdict"] == WITHIN_NOISE and one["diff"] == pytest.approx(40.0)
    assert verdict([None, None], [1.0, 2.0])["verdict"] == WITHIN_NOISE


def test_fmt_stats_by_hand():
    from spade.ablation.verdict import fmt_stats

    assert fmt_stats([1.0, 2.0, 6.0]) == "3.0 ± 2.6"
    assert fmt_stats([0.0042, 0.0044]) == "0.0043 ± 0.0001"
    assert fmt_stats([7.0]) == "7.0" and fmt_stats([None]) == "n/a"
    # a loss column keeps 4 decimals above 0.1 too, so its rows read alike
    assert fmt_stats([0.2, 0.21], digits=4) == "0.2050 ± 0.0071"


def test_metric_drop_and_missing():
    assert metric({"psg": {"R@50_near": 40.0, "R@50_distant": 25.0}}, "R@50_drop") == 15.0
    assert metric({"psg": {"R@50_near": 40.0, "R@50_distant": None}}, "R@50_drop") is None
    assert metric({"psg": {"R@50": 3.0}}, "R@50") == 3.0


# ---------------------------------------------------------------- study layout


def test_tables_cover_the_issue_and_share_runs(tmp_path):
    tables = build_tables(SCHEDULES["full"], str(tmp_path / "data"))
    keys = [t.key for t in tables]
    assert keys == [
        "rgt", "calibration_ovr", "calibration_ovdr", "branch", "distance", "graph", "student_maps",
        "ov_settings"
    ]  # fmt: skip
    rgt = tables[0]
    assert [r.compare_to for r in rgt.rows] == [None] + [r.name for r in rgt.rows[:-1]]
    for t in tables:
        for r in t.rows:
            assert len(r.runs) == 3  # >= 3 seeds for every row
    # the full RGT row, the distance table's SPADE row and the graph table's fixed row are the
    # same runs (trained once)
    full = tables[0].rows[-1].runs
    assert tables[4].rows[-1].runs == full and tables[5].rows[0].runs == full
    # every calibration row but "no calibration" has its own stage 1, on its own setting
    calib = tables[1]
    assert calib.rows[0].stage1 == [None] * 3
    s1_configs = {r.stage1[0].config_file for r in calib.rows[1:]}
    assert s1_configs == {"configs/calibration/SynthPSG-Tiny-OvR.yaml"}
    assert len({r.stage1[0] for r in calib.rows[1:]}) == 4
    # one stage 1 per row, shared by its seeds; the stage-2 runs differ by seed
    assert all(len(set(r.stage1)) == 1 for r in calib.rows[1:])
    assert all(len(set(r.stage2)) == 3 for t in tables for r in t.rows)
    # every row of the branch table, and the distance table's CLIP-only row, is an evaluation
    # with the CLIP predicate branch on (the SynthPSG configs leave it off, so without it the
    # fusion weight changes nothing): a = 1 / 0 / 0.34 (the reference) / the sweep
    branch, distance = tables[3], tables[4]
    evaluated = branch.rows + [distance.rows[1]]
    alphas = []
    for r in evaluated:
        assert all(run.kind == "eval" for run in r.runs), r.name
        opts = dict(zip(r.runs[0].opts[::2], r.runs[0].opts[1::2]))
        assert opts["MODEL.SPADE.RELATION.USE_CLIP_BRANCH"] == "True", r.name
        assert opts["MODEL.SPADE.RELATION.FUSION_BETA"] == opts["MODEL.SPADE.RELATION.FUSION_ALPHA"]
        alphas.append(float(opts["MODEL.SPADE.RELATION.FUSION_ALPHA"]))
    assert alphas == [1.0, 0.0, 0.34, 0.2, 0.5, 0.7, 0.0]
    assert branch.rows[0].compare_to == branch.rows[2].name == "fusion a = 0.34 (paper)"
    runs = all_runs(tables)
    assert len(runs) == len(set(runs))
    with pytest.raises(ValueError, match="selects no"):
        build_tables(SCHEDULES["quick"], str(tmp_path), ["nope"])


# ---------------------------------------------------------------- quick-mode run


def test_quick_mode_two_rows_write_a_well_formed_table(tmp_path):
    report = tmp_path / "ABLATIONS.md"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools/run_ablations.py"),
        "--quick",
        "--root",
        str(tmp_path / "study"),
        "--report",
        str(report),
        "--jobs",
        "1",
        "--only",
        "graph",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "3 runs (0 done, 3 to do)" in first.stdout
    text = report.read_text()
    assert "### Graph thresholds (closed set)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 3  # header + 2 rows
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    assert head[:4] == ["row", "R@50", "R@100", "mR@50"]
    for line in rows[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(head)
        # 1 seed: a mean and no std; n/a when no image got a relation (the benchmark's R@K
        # is then undefined, as after 4 iterations)
        assert re.fullmatch(r"\d+\.\d|n/a", cells[1]), cells
        assert re.fullmatch(r"\d+\.\d", cells[3]), cells  # mR@50 is always defined
        assert re.fullmatch(r"\d+", cells[-2]), cells  # ms / image
    assert "| fixed (eta 0.65, adjacency distance) |" in text and "reference" in text
    assert "within noise" in text  # one seed never gives a verdict
    assert (tmp_path / "ablations" / "graph.png").stat().st_size > 1000
    # a second call runs nothing and writes the same table
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 runs (3 done, 0 to do)" in second.stdout
    assert report.read_text().split("## Verdicts")[1] == text.split("## Verdicts")[1]


def test_cached_results_and_heldout_loss_from_the_log(tmp_path):
    from spade.ablation.runs import DONE, RunExecutor

    root = str(tmp_path)
    run = Run("stage1", STAGE1, ("SEED", "4"))
    ex = RunExecutor(root, jobs=1, progress=lambda m: None)
    assert ex.cached(run) is None  # never run
    folder = run_dir(run, root)
    os.makedirs(folder)
    (tmp_path / folder / "run.log").write_text(
        "...\n[x] Held-out L_cal: 0.009100 over 7 triplets\n[x] Held-out L_cal: 0.004310 over 94 "
        "triplets\n"
    )
    assert ex.cached(run) is None  # a log without done.json: unfinished, run again (--resume)
    (tmp_path / folder / DONE).write_text('{"kind": "stage1", "wall_s": 3.0}')
    got = ex.cached(run)
    assert got["heldout_loss_cal"] == pytest.approx(0.00431) and got["heldout_triplets"] == 94
