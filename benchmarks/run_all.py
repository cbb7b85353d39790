"""`make bench`: run every benchmark script and write one table, benchmarks/RESULTS.md.

Each script runs as a subprocess with ``--out benchmarks/results/<name>.json`` and prints its own
table as it goes; this script then renders every JSON's ``rows`` as a Markdown table under a header
naming the machine it ran on (CPU model, cores, memory, torch version, threads); every row also
carries the machine in its last column.

Each generated section sits between ``<!-- make bench: NAME -->`` and ``<!-- /make bench: NAME
-->`` lines. Only the sections of the benchmarks that ran are rewritten (in place, or appended at
the end when the file has none for them yet); every other part of the file, hand-written sections
included (the pretraining chains' times, the GPU runs), is kept as it was.

    python benchmarks/run_all.py [--only evaluator relation_head] [--quick]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (script, full arguments, quick arguments)
BENCHMARKS = {
    "inference": ("bench_inference.py", [], ["--presets", "tiny"]),
    "evaluator": ("bench_evaluator.py", ["--num-images", "300"], ["--num-images", "60"]),
    "relation_head": ("bench_relation_head.py", [], ["--queries", "25", "50", "100"]),
    "backbone": ("bench_backbone.py", [], ["--presets", "tiny"]),
    "teacher": ("bench_teacher.py", [], ["--models", "tiny"]),
    "pretrain": ("bench_pretrain.py", [], ["--configs", "vae_tiny", "clip_tiny", "--iters", "30"]),
}
TITLES = {
    "inference": "Whole-model inference per image (panoptic + scene graph), batch 1",
    "evaluator": "File-based PSG evaluator, whole process (480x640, 128x128; 150 triplets/image)",
    "relation_head": "Relation head scaling with the number of object queries Q",
    "backbone": "Diffusion backbone forward (512x512)",
    "teacher": "Stage-1 teacher-map throughput",
    "pretrain": "Stage-0 pretraining, seconds per iteration: fp32 vs mixed precision",
}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )


def rows_to_markdown(rows) -> str:
    if not rows:
        return "(no rows)\n"
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


HEADER = (
    "# SPADE benchmarks\n\nWritten by `make bench` (benchmarks/run_all.py); every table names "
    "the machine it ran on. Numbers on a shared machine are noisy. Sections between `make bench` "
    "markers are rewritten by it; the others are written by hand and kept.\n"
)


def _markers(name: str):
    return f"<!-- make bench: {name} -->", f"<!-- /make bench: {name} -->"


def merge_sections(old: str, sections: dict, where: str = "RESULTS.md") -> str:
    """``old`` (the file's text, "" when there is none) with each ``sections[name]`` put between
    its markers: replacing the marked section that is there, else appended at the end.

    A marker without its partner, or one that appears twice, is a ValueError naming ``where`` and
    the benchmark, so that a hand edit that broke a marker does not cost the text around it.
    """
    text = old if old.strip() else HEADER
    for name, body in sections.items():
        start, end = _markers(name)
        block = f"{start}\n{body.strip()}\n{end}"
        n_start, n_end = text.count(start), text.count(end)
        if (n_start, n_end) == (0, 0):
            text = text.rstrip("\n") + "\n\n" + block + "\n"
            continue
        i, j = text.find(start), text.find(end)
        if (n_start, n_end) != (1, 1) or j < i:
            raise ValueError(
                f"{where}: the markers of benchmark {name!r} are broken ({start!r} {n_start} "
                f"times, {end!r} {n_end} times, or the end before the start); mend them by hand"
            )
        text = text[:i] + block + text[j + len(end) :]
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=list(BENCHMARKS))
    p.add_argument("--quick", action="store_true", help="small sizes only (minutes, not an hour)")
    p.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = p.parse_args(argv)

    old = ""
    if os.path.isfile(args.results):
        with open(args.results, encoding="utf-8") as f:
            old = f.read()
    merge_sections(old, {name: "" for name in args.only}, args.results)  # broken markers: stop now
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    host = machine()
    short_host = host.split(";")[0]
    sections = {}
    for name in args.only:
        script, full, quick = BENCHMARKS[name]
        out = os.path.join(out_dir, f"{name}.json")
        cmd = [sys.executable, os.path.join(HERE, script), *(quick if args.quick else full)]
        cmd += ["--out", out]
        print(f"\n== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=ROOT)
        if rc != 0 or not os.path.isfile(out):
            sections[name] = f"## {TITLES[name]}\n\nFAILED (exit {rc}); see the console output.\n"
            continue
        with open(out) as f:
            payload = json.load(f)
        rows = payload.get("rows", [payload]) if isinstance(payload, dict) else payload
        rows = [{**row, "machine": short_host} for row in rows]
        extra = {
            k: v for k, v in payload.items() if k != "rows" and not isinstance(v, (dict, list))
        }
        note = ", ".join(f"{k}: {v}" for k, v in extra.items())
        sections[name] = (
            f"## {TITLES[name]}\n\nMachine: {host}. Took {time.time() - t0:.0f} s."
            + (f" {note}." if note else "")
            + f"\n\n{rows_to_markdown(rows)}"
        )
    text = merge_sections(old, sections, args.results)
    from spade.utils.io import atomic_write_bytes

    atomic_write_bytes(args.results, text.encode())
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
