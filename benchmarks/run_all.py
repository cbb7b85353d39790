"""`make bench`: run every benchmark script and write one table, benchmarks/RESULTS.md.

Each script runs as a subprocess with ``--out benchmarks/results/<name>.json`` and prints its own
table as it goes; this script then renders every JSON's ``rows`` as a Markdown table under a header
naming the machine it ran on (CPU model, cores, memory, torch version, threads); every row also
carries the machine in its last column.

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=list(BENCHMARKS))
    p.add_argument("--quick", action="store_true", help="small sizes only (minutes, not an hour)")
    p.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = p.parse_args(argv)

    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    host = machine()
    short_host = host.split(";")[0]
    sections = []
    for name in args.only:
        script, full, quick = BENCHMARKS[name]
        out = os.path.join(out_dir, f"{name}.json")
        cmd = [sys.executable, os.path.join(HERE, script), *(quick if args.quick else full)]
        cmd += ["--out", out]
        print(f"\n== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=ROOT)
        if rc != 0 or not os.path.isfile(out):
            sections.append(f"## {TITLES[name]}\n\nFAILED (exit {rc}); see the console output.\n")
            continue
        with open(out) as f:
            payload = json.load(f)
        rows = payload.get("rows", [payload]) if isinstance(payload, dict) else payload
        rows = [{**row, "machine": short_host} for row in rows]
        extra = {
            k: v for k, v in payload.items() if k != "rows" and not isinstance(v, (dict, list))
        }
        note = ", ".join(f"{k}: {v}" for k, v in extra.items())
        sections.append(
            f"## {TITLES[name]}\n\nMachine: {host}. Took {time.time() - t0:.0f} s."
            + (f" {note}." if note else "")
            + f"\n\n{rows_to_markdown(rows)}"
        )
    text = (
        "# SPADE benchmarks\n\nWritten by `make bench` (benchmarks/run_all.py); "
        "every table names the "
        "machine it ran on. Numbers on a shared machine are noisy.\n\n" + "\n".join(sections)
    )
    from spade.utils.io import atomic_write_bytes

    atomic_write_bytes(args.results, text.encode())
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
