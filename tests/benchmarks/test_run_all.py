"""benchmarks/run_all.py (`make bench`): it rewrites only the sections of the benchmarks it ran
and keeps every other part of RESULTS.md, hand-written sections included."""

import json

import pytest
from bench_modules import load_benchmark

run_all = load_benchmark("run_all")

OLD = """\
# SPADE benchmarks

Intro written by hand.

<!-- make bench: evaluator -->
## old evaluator table
| a |
|---|
| 1 |
<!-- /make bench: evaluator -->

## The UNet chain, by hand
| run | minutes |
|---|---|
| 1 | 60.3 |
"""


def test_merge_replaces_a_marked_section_in_place_and_keeps_the_rest():
    text = run_all.merge_sections(OLD, {"evaluator": "## new evaluator table\n\n| b |\n"})
    assert text == OLD.replace(
        "## old evaluator table\n| a |\n|---|\n| 1 |", "## new evaluator table\n\n| b |"
    )
    assert "old evaluator" not in text and "| 1 | 60.3 |" in text


def test_merge_appends_a_new_section_after_everything_else():
    text = run_all.merge_sections(OLD, {"teacher": "## teacher\n| t |"})
    assert text.startswith(OLD.rstrip("\n") + "\n\n")
    assert text.endswith(
        "<!-- make bench: teacher -->\n## teacher\n| t |\n<!-- /make bench: teacher -->\n"
    )
    # merging the same again replaces it: one section, not two
    again = run_all.merge_sections(text, {"teacher": "## teacher\n| u |"})
    assert again.count("<!-- make bench: teacher -->") == 1 and "| t |" not in again


def test_merge_into_no_file_starts_with_the_header():
    text = run_all.merge_sections("", {"inference": "## inference"})
    assert text.startswith(run_all.HEADER)
    assert text.endswith(
        "<!-- make bench: inference -->\n## inference\n<!-- /make bench: inference -->\n"
    )


@pytest.mark.parametrize(
    "broken",
    [
        OLD.replace("<!-- /make bench: evaluator -->\n", ""),  # end lost
        OLD.replace("<!-- make bench: evaluator -->\n", ""),  # start lost
        OLD + "<!-- make bench: evaluator -->\n",  # twice
    ],
)
def test_broken_markers_are_an_error_naming_the_file_and_benchmark(broken):
    with pytest.raises(ValueError, match=r"RESULTS\.md.*'evaluator'"):
        run_all.merge_sections(broken, {"evaluator": "x"}, "benchmarks/RESULTS.md")


FAKE_BENCH = """\
import argparse, json
p = argparse.ArgumentParser(); p.add_argument("--out"); p.add_argument("--n")
a = p.parse_args()
json.dump({"rows": [{"n": int(a.n), "s": 0.25}], "threads": 2}, open(a.out, "w"))
"""


def test_main_runs_the_chosen_benchmark_and_keeps_the_hand_written_sections(tmp_path, monkeypatch):
    (tmp_path / "bench_fake.py").write_text(FAKE_BENCH)
    monkeypatch.setattr(run_all, "HERE", str(tmp_path))
    monkeypatch.setattr(run_all, "BENCHMARKS", {"evaluator": ("bench_fake.py", ["--n", "7"], [])})
    results = tmp_path / "RESULTS.md"
    results.write_text(OLD)
    assert run_all.main(["--only", "evaluator", "--results", str(results)]) == 0
    text = results.read_text()
    assert "old evaluator" not in text
    assert "| n | s | machine |" in text and "| 7 | 0.25 |" in text and "threads: 2." in text
    assert "Intro written by hand." in text and "| 1 | 60.3 |" in text
    assert json.loads((tmp_path / "results" / "evaluator.json").read_text())["rows"][0]["n"] == 7


def test_main_stops_before_running_anything_when_a_marker_is_broken(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "HERE", str(tmp_path))
    ran = []
    monkeypatch.setattr(run_all.subprocess, "call", lambda *a, **k: ran.append(a) or 0)
    results = tmp_path / "RESULTS.md"
    broken = OLD.replace("<!-- /make bench: evaluator -->\n", "")
    results.write_text(broken)
    with pytest.raises(ValueError, match="evaluator"):
        run_all.main(["--only", "evaluator", "--results", str(results)])
    assert ran == [] and results.read_text() == broken


def test_the_shipped_results_file_has_whole_markers():
    with open(run_all.os.path.join(run_all.HERE, "RESULTS.md"), encoding="utf-8") as f:
        text = f.read()
    merged = run_all.merge_sections(text, {name: "x" for name in run_all.BENCHMARKS})
    assert "## Stage-0 UNet chain, the shorter one" in merged  # a hand-written section survives
    for name in run_all.BENCHMARKS:
        assert merged.count(f"<!-- make bench: {name} -->") == 1
    # the five generated sections already there are replaced in place, not appended again
    assert merged.index("<!-- make bench: teacher -->") < merged.index("## File-based evaluator at")
