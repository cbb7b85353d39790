"""Whole-process speed and peak memory of the file-based evaluator at PSG's resolution.

Writes (or reuses) randomised PSG benchmark files (tests/evaluation/psg_files.py: psg.json,
ground-truth PNGs, a submission with ``--rows`` ranked triplets per image) and times, each as a
fresh process on the same files and the same cores:

- ours: ``python -m spade.evaluation.psg_evaluation`` (R/mR/ngR/... both MPO protocols + PQ) with
  the evaluation modules only (the ``spade`` package __init__, which registers the model stack,
  bypassed), and as shipped (``python -m``, through ``spade/__init__``);
- floor: read psg.json + relation.json and decode every PNG once, with the same worker count;
- benchmark's own code: the per-row loop of the PSG benchmark's metric
  (tests/evaluation/psg_reference.py, R/mR only, one process).

Peak memory is the largest resident set of any process of the run (ru_maxrss of the children).

    OMP_NUM_THREADS=1 python benchmarks/bench_evaluator.py --size 480x640 --num-images 300
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TESTS = os.path.join(REPO, "tests", "evaluation")

# the evaluation modules without the package __init__ (what a light spade/__init__ would give)
_BARE = (
    "import sys, types\n"
    "pkg = types.ModuleType('spade'); pkg.__path__ = [{spade!r}]; sys.modules['spade'] = pkg\n"
    "from spade.evaluation.psg_evaluation import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)

_FLOOR = (
    "import json, multiprocessing, os, sys\n"
    "import numpy as np\n"
    "from PIL import Image\n"
    "gt_json, seg_root, pred_dir, workers = sys.argv[1:5]\n"
    "data = json.load(open(gt_json))\n"
    "entries = json.load(open(os.path.join(pred_dir, 'relation.json')))\n"
    "test = set(data['test_image_ids'])\n"
    "paths = [os.path.join(seg_root, d['pan_seg_file_name']) for d in data['data']\n"
    "         if d['relations'] and d['image_id'] in test]\n"
    "paths += [os.path.join(pred_dir, 'panseg', e['pan_seg_file_name']) for e in entries]\n"
    "def decode(p):\n"
    "    with Image.open(p) as img:\n"
    "        return int(np.asarray(img).shape[0])\n"
    "n = int(workers)\n"
    "if n > 1:\n"
    "    with multiprocessing.get_context('fork').Pool(n) as pool:\n"
    "        list(pool.imap(decode, paths, chunksize=max(1, min(8, len(paths) // (8 * n)))))\n"
    "else:\n"
    "    list(map(decode, paths))\n"
)

_LAUNCH = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
    "wall = time.perf_counter() - t\n"
    "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
    "print(json.dumps({'rc': r.returncode, 'wall_s': wall, 'peak_MiB': rss,\n"
    "                  'stderr': r.stderr.decode()[-2000:]}))\n"
)


def measure(cmd, env) -> dict:
    """Wall time and peak RSS of ``cmd`` run as a fresh process (timed from a small launcher)."""
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCH, *cmd], env=env, capture_output=True, text=True, check=True
    )
    row = json.loads(out.stdout)
    if row["rc"] != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {row['stderr']}")
    return row


def bench_size(args, height: int, width: int) -> dict:
    """One row: every run on the files of one map size."""
    from psg_files import write_psg_case

    size = f"{height}x{width}"
    root = f"{args.root}_{size}_{args.num_images}_{args.rows}"
    if not os.path.isfile(os.path.join(root, "submission", "relation.json")):
        os.makedirs(root, exist_ok=True)
        write_psg_case(root, args.num_images, height, width, seed=0, rows=args.rows)
    gt_json, pred_dir = os.path.join(root, "psg.json"), os.path.join(root, "submission")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, REPO]))
    env.setdefault("OMP_NUM_THREADS", "1")
    files = ["--gt", gt_json, "--seg-root", root, "--pred-dir", pred_dir, "--protocol", "both"]
    files += ["--workers", str(args.workers)]
    py = sys.executable
    spade_dir = os.path.join(os.path.abspath(REPO), "spade")
    runs = {
        "ours": [py, "-c", _BARE.format(spade=spade_dir), *files],
        "floor": [py, "-c", _FLOOR, gt_json, root, pred_dir, str(args.workers)],
        "benchmark_code": [py, os.path.join(TESTS, "psg_reference.py"), gt_json, root, pred_dir],
    }
    if not args.skip_shipped:
        runs["ours_shipped"] = [py, "-m", "spade.evaluation.psg_evaluation", *files]
    best = {}
    for _ in range(args.repeats):
        for name, cmd in runs.items():
            row = measure(cmd, env)
            if name not in best or row["wall_s"] < best[name]["wall_s"]:
                best[name] = row
    n = args.num_images
    result = {
        "size": size,
        "images": n,
        "rows_per_image": args.rows,
        "workers": args.workers,
        "threads": env["OMP_NUM_THREADS"],
    }
    for name, row in best.items():
        result[f"{name}_s"] = round(row["wall_s"], 2)
        result[f"{name}_images_per_s"] = round(n / row["wall_s"], 1)
        result[f"{name}_peak_MiB"] = round(row["peak_MiB"], 1)
    result["ours_over_floor"] = round(best["ours"]["wall_s"] / best["floor"]["wall_s"], 2)
    result["speedup_vs_benchmark_code"] = round(
        best["benchmark_code"]["wall_s"] / best["ours"]["wall_s"], 2
    )
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="480x640,128x128", help="HxW of the maps, per row")
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--rows", type=int, default=150, help="ranked triplets per image")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the fastest counts")
    parser.add_argument("--skip-shipped", action="store_true", help="skip the python -m run")
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "spade_bench_eval"))
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    sys.path.insert(0, TESTS)
    sys.path.insert(0, REPO)
    rows = []
    for size in args.sizes.split(","):
        height, width = (int(v) for v in size.split("x"))
        rows.append(bench_size(args, height, width))
        print(f"File-based evaluator, {size} (whole process, fastest of --repeats)")
        for k, v in rows[-1].items():
            print(f"  {k:<32}  {v}")
    payload = {"rows": rows, "cpus": os.cpu_count()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
    return payload


if __name__ == "__main__":
    main()
