"""benchmarks/pretrain_times.py: the per-run wall times it reads from detectron2 logs, on a
hand-written log of a run interrupted once, resumed, then re-measured with --eval-only."""

import json

from bench_modules import load_benchmark

LOG = """\
[12/02 10:00:00] detectron2 INFO: Rank of current process: 0. World size: 1
[12/02 10:00:05] detectron2 INFO: Command line arguments: Namespace(resume=True)
[12/02 10:02:00] d2.engine.train_loop INFO: Starting training from iteration 0
[12/02 10:30:00] d2.utils.events INFO:  eta: 0:30:00  iter: 819  total_loss: 0.1
[12/02 10:31:00] detectron2 INFO: Rank of current process: 0. World size: 1
[12/02 10:32:00] d2.engine.train_loop INFO: Starting training from iteration 800
[12/02 11:05:20] d2.engine.hooks INFO: Overall training speed: 998 iterations in 0:33:16 (2.0000 s / it)
[12/02 11:05:20] d2.engine.hooks INFO: Total training time: 0:33:20 (0:00:04 on hooks)
[12/02 11:05:30] spade.pretrain.run INFO: exported unet to output/x/unet
[12/02 11:15:20] spade.pretrain.run INFO: gates of output/x/unet:
{
[12/02 12:00:00] detectron2 INFO: Rank of current process: 0. World size: 1
[12/02 12:04:00] spade.pretrain.run INFO: gates of output/x/unet:
"""  # noqa: E501


pretrain_times = load_benchmark("pretrain_times")


def test_processes_and_row_from_a_resumed_run(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(LOG)
    procs = pretrain_times.parse_log(str(log))
    assert len(procs) == 3
    first, second, evaluation = procs
    assert first["first_iter"] == 0 and "train_end" not in first  # killed while training
    assert first["iters"] == 820 and first["train_s"] == 28 * 60  # to its last log line
    assert (first["end"] - first["start"]).total_seconds() == 30 * 60
    assert second["first_iter"] == 800 and second["iters"] == 998 and second["s_per_it"] == 2.0
    assert second["train_s"] == 33 * 60 + 20
    assert evaluation["train_start"] is None

    row = pretrain_times.run_row("unet_tiny", procs)
    assert row["processes"] == 2 and row["eval_only_processes"] == 1
    assert row["first_iteration"] == 0 and row["iterations"] == 820 + 998  # 800-819 twice
    assert row["s_per_it"] == round(3680 / 1818, 3)
    assert row["setup_min"] == 3.0  # 2 min before the first start of training, 1 before the second
    assert row["train_min"] == round(3680 / 60, 1)
    assert row["after_min"] == round(600 / 60, 1)  # 11:05:20 -> 11:15:20: export and gates
    assert row["wall_min"] == 30.0 + 44.3  # 10:00:00-10:30:00 and 10:31:00-11:15:20
    assert row["finished"]


def test_main_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "unet"
    out.mkdir()
    (out / "log.txt").write_text(LOG)
    missing = tmp_path / "none"
    js = tmp_path / "times.json"
    pretrain_times.main(
        ["--configs", "unet_tiny", "--opts", "OUTPUT_DIR", str(out), "--out", str(js)]
    )
    text = capsys.readouterr().out
    assert "unet_tiny" in text and "74.3" in text
    rows = json.load(open(js))["rows"]
    assert rows[0]["wall_min"] == 74.3 and rows[0]["start"] == "12/02 10:00:00"
    pretrain_times.main(["--configs", "unet_tiny", "--opts", "OUTPUT_DIR", str(missing)])
    assert "no log" in capsys.readouterr().out


def test_a_log_without_training_is_reported_as_such(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("[12/02 12:00:00] detectron2 INFO: Rank of current process: 0. World size: 1\n")
    row = pretrain_times.run_row("clip_tiny", pretrain_times.parse_log(str(log)))
    assert row == {"config": "clip_tiny", "processes": 0, "eval_only_processes": 1}
