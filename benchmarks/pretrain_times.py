#!/usr/bin/env python
"""Wall time of every stage-0 run of a ``make pretrain`` (or of any of its configs), from the logs.

Reads each config's ``OUTPUT_DIR/log.txt`` (detectron2's log, which SPADE's loggers write to as
well) and splits it into the processes that wrote it: a run interrupted and continued with
``--resume`` has several, a gate re-measurement (``--eval-only``) has one without training. Per
run it prints the iterations trained, the seconds per iteration (training time over them), the
minutes before training (set-up: corpus, caches), in training, after it (export and gates) and
in all, and the span from the first run's start to the last one's end (the CPU
``make pretrain`` trains CLIP beside the VAE, so its span is shorter than the sum). Run it
after ``make pretrain``:

    python benchmarks/pretrain_times.py                      # the CPU chain's configs
    python benchmarks/pretrain_times.py --configs unet_tiny unet_tiny_grounded --out t.json
    python benchmarks/pretrain_times.py --configs unet_tiny --opts OUTPUT_DIR output/x

Log timestamps have one-second resolution and no year (runs across New Year are not handled).
"""

import argparse
import datetime as dt
import os
import re
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench_pretrain import CPU_CHAIN, pretrain_cfg  # noqa: E402

_STAMP = re.compile(r"^\[(\d\d)/(\d\d) (\d\d):(\d\d):(\d\d)")
_START = "Rank of current process"  # default_setup's first line: a new process
_TRAIN = re.compile(r"Starting training from iteration (\d+)")
_SPEED = re.compile(r"Overall training speed: (\d+) iterations in \S+ \(([\d.]+) s / it\)")
_TOTAL = re.compile(r"Total training time: (\d+):(\d\d):(\d\d)")
_ITER = re.compile(r" iter: (\d+) ")  # detectron2's periodic metrics line


def _time(line: str, year: int) -> Optional[dt.datetime]:
    m = _STAMP.match(line)
    if not m:
        return None
    mo, d, h, mi, s = (int(g) for g in m.groups())
    return dt.datetime(year, mo, d, h, mi, s)


def parse_log(path: str, year: int = 2000) -> List[Dict]:
    """The processes that wrote ``path``, in order: start and end time, training start, its
    first iteration, iterations trained, detectron2's seconds per iteration, training seconds
    (None where the process did not train). A process killed while training counts its training
    to its last log line and its iterations to the last one logged; ``train_end`` is set only
    where training finished."""
    procs: List[Dict] = []
    with open(path, errors="replace") as f:
        for line in f:
            t = _time(line, year)
            if t is None:
                continue
            if _START in line or not procs:
                procs.append({"start": t, "end": t, "train_start": None, "first_iter": None,
                              "iters": None, "s_per_it": None, "train_s": None})  # fmt: skip
            p = procs[-1]
            p["end"] = t
            m = _TRAIN.search(line)
            if m:
                p["train_start"], p["first_iter"] = t, int(m.group(1))
            m = _SPEED.search(line)
            if m:
                p["iters"], p["s_per_it"] = int(m.group(1)), float(m.group(2))
            m = _TOTAL.search(line)
            if m:
                h, mi, s = (int(g) for g in m.groups())
                p["train_s"], p["train_end"] = 3600 * h + 60 * mi + s, t
            m = _ITER.search(line)
            if m:
                p["last_iter"] = int(m.group(1))
    for p in procs:  # a process killed while training: up to its last logged iteration
        if p["train_start"] is not None and p["train_s"] is None:
            p["train_s"] = (p["end"] - p["train_start"]).total_seconds()
            p["iters"] = p.get("last_iter", p["first_iter"] - 1) + 1 - p["first_iter"]
    return procs


def run_row(name: str, procs: List[Dict]) -> Dict:
    """One table row from a run's processes (training processes only; eval-only ones counted).
    ``s_per_it`` is the run's training seconds over its iterations, iterations that a resumed
    process repeated after its last checkpoint included."""
    train = [p for p in procs if p["train_start"] is not None]
    row = {"config": name, "processes": len(train), "eval_only_processes": len(procs) - len(train)}
    if not train:
        return row
    done = [p for p in train if "train_end" in p]
    row["first_iteration"] = train[0]["first_iter"]
    row["iterations"] = sum(p["iters"] for p in train)
    train_s = sum(p["train_s"] for p in train)
    row["s_per_it"] = round(train_s / row["iterations"], 3) if row["iterations"] else None
    row["setup_min"] = round(
        sum((p["train_start"] - p["start"]).total_seconds() for p in train) / 60, 1
    )
    row["train_min"] = round(train_s / 60, 1)
    row["after_min"] = round(sum((p["end"] - p["train_end"]).total_seconds() for p in done) / 60, 1)
    row["wall_min"] = round(sum((p["end"] - p["start"]).total_seconds() for p in train) / 60, 1)
    row["finished"] = "train_end" in train[-1]
    row["start"], row["end"] = train[0]["start"], train[-1]["end"]
    return row


def output_dir(name: str, opts: List[str]) -> str:
    out = str(pretrain_cfg(name, opts).OUTPUT_DIR)
    return out if os.path.isabs(out) else os.path.join(ROOT, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=CPU_CHAIN, help="configs/pretrain/NAME.yaml")
    p.add_argument("--opts", nargs="*", default=[], help="config options the runs were given")
    p.add_argument("--out", default="", help="also write the rows as JSON here")
    a = p.parse_args(argv)
    rows, year = [], dt.date.today().year
    for name in a.configs:
        log = os.path.join(output_dir(name, a.opts), "log.txt")
        if not os.path.isfile(log):
            print(f"{name:22} no log: {log}")
            continue
        rows.append(run_row(name, parse_log(log, year)))
    head = f"{'config':22} {'proc':>4} {'iters':>6} {'s/it':>7} {'setup':>7} {'train':>7} "
    print(head + f"{'after':>7} {'wall':>7}  (minutes; after = export + gates)")
    for r in rows:
        if "wall_min" not in r:
            print(f"{r['config']:22} no training in the log")
            continue
        flag = "" if r["finished"] else "  (training not finished)"
        print(
            f"{r['config']:22} {r['processes']:4d} {r['iterations']:6d} "
            f"{r['s_per_it'] or float('nan'):7.3f} {r['setup_min']:7.1f} {r['train_min']:7.1f} "
            f"{r['after_min']:7.1f} {r['wall_min']:7.1f}{flag}"
        )
    timed = [r for r in rows if "wall_min" in r]
    if timed:
        total = sum(r["wall_min"] for r in timed)
        span = (max(r["end"] for r in timed) - min(r["start"] for r in timed)).total_seconds()
        print(f"{'sum of the runs':22} {total:48.1f}")
        print(f"{'first start -> last end':22} {span / 60:48.1f}")
    if a.out:
        from spade.utils.io import atomic_write_json

        for r in rows:
            for k in ("start", "end"):
                if k in r:
                    r[k] = r[k].strftime("%m/%d %H:%M:%S")
        atomic_write_json(a.out, {"rows": rows}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
