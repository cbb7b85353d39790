#!/usr/bin/env python
"""`make ablations`: the paper's ablations in miniature on SynthPSG, several seeds, one table.

    python tools/run_ablations.py                     # the whole study -> docs/ABLATIONS.md
    python tools/run_ablations.py --quick             # smoke test: 1 seed, a few images/iterations
    python tools/run_ablations.py --only rgt graph    # some tables ("rgt:pair MLP" = some rows)
    python tools/run_ablations.py --jobs 4            # 4 runs at once (default: GPUs, else cores)

Each run is a real entry point (calibrate_net.py, train_net.py) in a folder named by the hash of its
full config (spade/ablation/runs.py), so an interrupted study continues where it stopped (the
unfinished run with --resume) and a second call only prints the table. Rows and schedule:
spade/ablation/study.py; verdict rule: spade/ablation/verdict.py.
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu})"
    if torch.cuda.is_available():
        text += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        text += ", no GPU"
    return text


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True)
        return out.stdout.decode().strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, short schedule (smoke test)")
    p.add_argument("--root", default="", help="study folder (default output/ablations[_quick])")
    p.add_argument("--only", nargs="*", default=None, help="table keys or 'table:row prefix'")
    p.add_argument("--jobs", type=int, default=0, help="runs at once (0: GPUs, else CPU cores)")
    p.add_argument("--report", default="", help="Markdown file (default docs/ABLATIONS.md)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run none")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the runs done so far (missing seeds count as absent)",
    )
    args = p.parse_args(argv)

    import torch

    from spade.ablation.report import write_report
    from spade.ablation.runs import RunExecutor, run_dir
    from spade.ablation.study import SCHEDULES, all_runs, build_tables
    from spade.data.synthpsg import ensure_synthpsg

    schedule = SCHEDULES["quick" if args.quick else "full"]
    root = os.path.abspath(args.root or os.path.join(ROOT, "output", f"ablations_{schedule.name}"))
    report = args.report or (
        os.path.join(root, "ABLATIONS.md")
        if args.quick
        else os.path.join(ROOT, "docs/ABLATIONS.md")
    )
    charts = os.path.join(os.path.dirname(os.path.abspath(report)), "ablations")
    data_root = os.path.join(root, "synthpsg")
    tables = build_tables(schedule, data_root, args.only)
    runs = all_runs(tables)

    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    jobs = args.jobs or len(gpus) or (os.cpu_count() or 1)
    executor = RunExecutor(root, jobs=jobs, gpus=gpus, progress=lambda m: print(m, flush=True))
    todo = [r for r in runs if executor.cached(r) is None]
    print(
        f"{len(runs)} runs ({len(runs) - len(todo)} done, {len(todo)} to do) under {root}; "
        f"{jobs} at once, {executor.threads} thread(s) each",
        flush=True,
    )
    if args.dry_run:
        for r in runs:
            state = "done" if executor.cached(r) is not None else "todo"
            print(f"  {state}  {os.path.basename(run_dir(r, root))}  {r.config_file}")
        return 0

    if args.report_only:
        found = {r: executor.cached(r) for r in runs}
        results = {r: res for r, res in found.items() if res is not None}
    else:
        if todo:
            ensure_synthpsg(data_root, num_images=schedule.num_images, seed=0, size=128)
        results = executor.run_all(runs)
    # wall time: from the start of the earliest run to the end of the latest one (each done.json
    # is written when its run ends and holds the run's duration); pauses between interrupted
    # invocations and other work on the machine are included, not subtracted
    spans = []
    for r, res in results.items():
        done = os.path.join(run_dir(r, root), "done.json")
        if os.path.isfile(done):
            end = os.path.getmtime(done)
            spans.append((end - float(res.get("wall_s", 0.0)), end))
    wall_s = (max(e for _, e in spans) - min(b for b, _ in spans)) if spans else 0.0
    last = max((e for _, e in spans), default=time.time())
    run_seconds = sum(float(res.get("wall_s", 0.0)) for res in results.values())
    header = {
        "Date": datetime.datetime.fromtimestamp(last).isoformat(timespec="seconds"),
        "Machine": _machine(),
        "Wall time of the study": f"{wall_s / 60:.1f} min from the first run's start to the "
        f"last run's end "
        f"({len(results)} of {len(runs)} runs done, {run_seconds / 60:.1f} run-minutes, "
        f"{jobs} at once)",
        "Code": f"commit {_commit()}",
    }
    path = write_report(tables, results, schedule, report, header, charts)
    with open(path) as f:
        print(f.read())
    print(f"Wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
