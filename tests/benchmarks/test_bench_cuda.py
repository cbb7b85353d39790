"""benchmarks/bench_cuda.py in its CPU smoke mode: the tiny preset, one timed run per mode, the
JSON / Markdown it writes, and a failing row recorded instead of ending the run."""

import json

from bench_modules import load_benchmark

ROW_KEYS = {
    "preset",
    "image",
    "batch",
    "mode",
    "precision",
    "s_per_image",
    "s_min",
    "images_per_s",
    "mem_peak_GiB",
    "mem_extra_GiB",
    "params_M",
    "trainable_M",
    "repeats",
    "detail",
}


bench_cuda = load_benchmark("bench_cuda")
SMOKE = ["--device", "cpu", "--presets", "tiny", "--repeats", "1"]
TEACHER = ["--teacher-steps", "2", "--teacher-triplets", "1"]


def test_cpu_smoke_one_row_per_mode(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    payload = bench_cuda.main(
        SMOKE
        + ["--modes", "infer", "train", "teacher"]
        + TEACHER
        + ["--out", str(out), "--markdown", str(md)]
    )
    data = json.loads(out.read_text())
    assert data["rows"] == payload["rows"]
    assert data["complete"] is True and data["device"] == "cpu"
    assert data["tf32_matmul"] is False  # TF32 is a CUDA setting
    assert data["elapsed_s"] > 0 and data["build_s"]["tiny"] > 0
    assert [r["mode"] for r in data["rows"]] == ["infer", "train", "teacher"]
    for row in data["rows"]:
        assert not row.get("error"), row
        assert ROW_KEYS <= set(row), sorted(ROW_KEYS - set(row))
        assert row["preset"] == "tiny" and row["image"] == "128x128" and row["precision"] == "fp32"
        assert row["s_per_image"] > 0 and row["s_min"] > 0 and row["images_per_s"] > 0
        assert row["mem_peak_GiB"] > 0 and row["params_M"] > row["trainable_M"] > 0
    rows = {r["mode"]: r for r in data["rows"]}
    assert "triplets" in rows["infer"]["detail"]
    assert "loss" in rows["train"]["detail"]
    assert rows["teacher"]["detail"] == "2 steps, T=1, 3 UNet passes"  # BELM: 2 + 2 - 1
    text = md.read_text()
    assert "Machine: " in text and "bench_cuda.py --device cpu" in text
    assert "| preset | image | batch | mode | precision | s_per_image |" in text
    assert "|---|" in text and "PARTIAL" not in text


def test_failing_row_is_recorded_and_earlier_rows_are_on_disk(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"

    def out_of_memory(ctx, dtype, repeats):
        on_disk = json.loads(out.read_text())  # written after the infer row, before this one
        assert [r["mode"] for r in on_disk["rows"]] == ["infer"] and not on_disk["complete"]
        raise RuntimeError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setitem(bench_cuda.RUNNERS, "train", out_of_memory)
    payload = bench_cuda.main(SMOKE + ["--modes", "infer", "train", "--out", str(out)])
    infer, train = payload["rows"]
    assert not infer.get("error") and infer["s_per_image"] > 0
    assert train["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 80.00 GiB"
    assert "s_per_image" not in train
    assert json.loads(out.read_text())["complete"] is True
