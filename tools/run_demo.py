#!/usr/bin/env python
"""The main job (`make demo`): the whole SPADE method on SynthPSG, on a CPU, in one folder.

Steps (each reuses what an earlier run left, unless --fresh):
  1. data     generate SynthPSG                                 -> OUT/synthpsg/
  2. stage 1  inversion-guided calibration (tiny UNet, LoRA)    -> OUT/stage1/model_final...
  3. stage 2  panoptic + relation training on the calibrated UNet -> OUT/stage2/model_final...
  4. eval     R@K / mR@K / PQ on synthpsg_val                   -> OUT/eval/
  5. visual   panoptic overlays + scene graphs for val images   -> OUT/vis/

Each stage runs its real entry point (calibrate_net.py, train_net.py, demo.py) as a subprocess,
so its progress (detectron2's logger with ETA, tqdm bars) shows as it goes. An interrupted run
continues from the last checkpoint the next time (`--resume`).
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIB_CONFIG = os.path.join(ROOT, "configs/calibration/SynthPSG-Tiny.yaml")
STAGE2_CONFIG = os.path.join(ROOT, "configs/synthetic/spade_tiny_synthpsg.yaml")
SETTINGS = ("closed", "ovr", "ovd", "ovdr")
TABLE_KEYS = ["R@20", "R@50", "R@100", "mR@20", "mR@50", "mR@100"]


def _banner(text: str) -> None:
    print(f"\n{'=' * 78}\n== {text}\n{'=' * 78}", flush=True)


def _run(cmd, log_name: str, out: str) -> None:
    """Run ``cmd`` with its output shown live and kept in OUT/logs/<log_name>.log."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    log_path = os.path.join(out, "logs", f"{log_name}.log")
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"run_demo: step '{log_name}' failed (exit {rc}); see {log_path}")


def setting_configs(setting: str):
    """(stage-1 config, stage-2 config, evaluation dataset) of a setting: the closed set or one of
    the paper's open-vocabulary settings (OvR novel predicates, OvD novel object classes, OvD+R
    both), each calibrated and trained on its own training split, evaluated on its val split."""
    if setting not in SETTINGS:
        raise ValueError(f"--setting must be one of {SETTINGS}, got {setting!r}")
    if setting == "closed":
        return CALIB_CONFIG, STAGE2_CONFIG, "synthpsg_val"
    suffix = {"ovr": "OvR", "ovd": "OvD", "ovdr": "OvDR"}[setting]
    calib = os.path.join(ROOT, f"configs/calibration/SynthPSG-Tiny-{suffix}.yaml")
    stage2 = os.path.join(ROOT, f"configs/synthetic/spade_tiny_synthpsg_{setting}.yaml")
    return calib, stage2, f"synthpsg_val_{setting}"


def _data_opts(data_root: str, num_images: int):
    return ["DATASETS.SYNTHPSG.ROOT", data_root, "DATASETS.SYNTHPSG.NUM_IMAGES", str(num_images)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", default="output/demo", help="folder for everything the demo writes")
    p.add_argument("--fresh", action="store_true", help="start over (delete the output folder)")
    p.add_argument("--num-images", type=int, default=600, help="SynthPSG images to generate")
    p.add_argument("--stage1-iters", type=int, default=0, help="override stage-1 iterations")
    p.add_argument("--stage2-iters", type=int, default=0, help="override stage-2 iterations")
    p.add_argument("--num-vis", type=int, default=4, help="val images to visualise")
    p.add_argument(
        "--setting",
        default="closed",
        choices=SETTINGS,
        help="closed set, or an open-vocabulary setting (its own stage 1, stage 2 and val split)",
    )
    p.add_argument(
        "--eval-period",
        type=int,
        default=250,
        help="evaluate synthpsg_val every N stage-2 iterations (learning curve; 0 = never)",
    )
    args = p.parse_args(argv)
    calib_config, stage2_config, val_name = setting_configs(args.setting)

    out = os.path.abspath(args.output)
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    data_root = os.path.join(out, "synthpsg")
    t0 = time.time()

    _banner("1/5 data: SynthPSG")
    sys.path.insert(0, ROOT)
    from spade.data.synthpsg import ensure_synthpsg

    ensure_synthpsg(data_root, num_images=args.num_images, seed=0, size=128)
    print(f"SynthPSG ready at {data_root}", flush=True)

    _banner("2/5 stage 1: inversion-guided calibration")
    stage1 = os.path.join(out, "stage1")
    calibrated = os.path.join(stage1, "model_final.safetensors")
    if os.path.isfile(calibrated):
        print(f"reusing {calibrated}", flush=True)
    else:
        opts = ["OUTPUT_DIR", stage1] + _data_opts(data_root, args.num_images)
        if args.stage1_iters:
            opts += ["SOLVER.MAX_ITER", str(args.stage1_iters)]
        cmd = [py, "projects/SPADE/calibrate_net.py", "--config-file", calib_config, "--resume"]
        _run(cmd + opts, "stage1", out)

    _banner("3/5 stage 2: panoptic + relation training")
    stage2 = os.path.join(out, "stage2")
    final = os.path.join(stage2, "model_final.safetensors")
    common = ["MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS", calibrated] + _data_opts(
        data_root, args.num_images
    )
    if os.path.isfile(final):
        print(f"reusing {final}", flush=True)
    else:
        opts = ["OUTPUT_DIR", stage2, "TEST.EVAL_PERIOD", str(args.eval_period)] + common
        if args.stage2_iters:
            opts += ["SOLVER.MAX_ITER", str(args.stage2_iters)]
        cmd = [py, "projects/SPADE/train_net.py", "--config-file", stage2_config, "--resume"]
        _run(cmd + opts, "stage2", out)

    _banner(f"4/5 evaluation on {val_name}")
    eval_dir = os.path.join(out, "eval")
    cmd = [py, "projects/SPADE/train_net.py", "--config-file", stage2_config, "--eval-only"]
    opts = ["OUTPUT_DIR", eval_dir, "MODEL.WEIGHTS", final, "DATASETS.TEST", f"('{val_name}',)"]
    _run(cmd + opts + common, "eval", out)
    _learning_curve(stage2, eval_dir)

    _banner("5/5 visualisations")
    vis_dir = os.path.join(out, "vis")
    with open(os.path.join(data_root, "psg.json")) as f:
        psg = json.load(f)
    val_ids = set(psg.get("val_image_ids", psg["test_image_ids"]))
    files = [
        os.path.join(data_root, d["file_name"]) for d in psg["data"] if d["image_id"] in val_ids
    ]
    cmd = [py, "projects/SPADE/demo.py", "--config-file", stage2_config, "--output", vis_dir]
    cmd += ["--input"] + files[: args.num_vis] + ["--opts", "MODEL.WEIGHTS", final] + common
    _run(cmd, "vis", out)

    _banner(f"done in {(time.time() - t0) / 60:.1f} min; everything is under {out}")
    results = sorted(glob.glob(os.path.join(eval_dir, "**", "*.json"), recursive=True))
    _print_table(results)
    print(
        f"\nOutputs: {out}\n  stage1/ (calibrated LoRA + adapter)  stage2/ (model)  "
        f"eval/ (metrics JSON, per-predicate chart)  vis/ (PNG + JSON)  logs/",
        flush=True,
    )
    return 0


def _learning_curve(stage2: str, eval_dir: str) -> None:
    """OUT/stage2/learning_curve.png: the periodic val evaluations of stage 2 + the final one."""
    from spade.evaluation.report import plot_learning_curve

    metrics = os.path.join(stage2, "metrics.json")
    final = glob.glob(os.path.join(eval_dir, "inference", "*", "psg_evaluation.json"))
    if not os.path.isfile(metrics):
        return
    result, last_iter = None, 0
    if final:
        with open(final[0]) as f:
            result = json.load(f)
        import yaml

        with open(os.path.join(stage2, "config.yaml")) as f:
            last_iter = int(yaml.safe_load(f)["SOLVER"]["MAX_ITER"])
    path = plot_learning_curve(
        metrics,
        os.path.join(stage2, "learning_curve.png"),
        "SPADE stage 2 on SynthPSG: synthpsg_val during training",
        final=result,
        final_iteration=last_iter,
    )
    if path:
        print(f"Learning curve: {path}", flush=True)


def _fmt(value) -> str:
    return "   n/a" if value is None else f"{value:6.2f}"


def _print_table(result_files) -> None:
    """Print R/mR@K (benchmark protocol, strict variant beside it) and PQ from the evaluator JSON.

    "n/a": the benchmark's R@K leaves out images without predicted relations, so it is undefined
    when no image has any; the strict column counts such images as 0.
    """
    for path in result_files:
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError):
            continue
        psg = res.get("psg") if isinstance(res, dict) else None
        if not isinstance(psg, dict) or "R@50" not in psg:
            continue
        single = res.get("psg_single") or {}
        print(f"\nSynthPSG val ({os.path.relpath(path)}):")
        print(f"  {'metric':<8}{'value':>6}  {'strict':>6}  {'single-MPO':>10}")
        for key in TABLE_KEYS:
            print(
                f"  {key:<8}{_fmt(psg[key])}  {_fmt(psg.get(key + '_strict'))}  "
                f"{_fmt(single.get(key)):>10}"
            )
        n, n_all = int(psg.get("num_images", 0)), int(psg.get("num_images_strict", 0))
        share = 100.0 * n / n_all if n_all else 0.0
        print(f"  images with predicted relations: {n} of {n_all} ({share:.0f} %)")
        pan = res.get("panoptic_seg", {})
        for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
            if key in pan:
                print(f"  {key:<8}{_fmt(pan[key])}")
        return


if __name__ == "__main__":
    sys.exit(main())
