#!/usr/bin/env python
"""Where one stage-0 pretraining step spends its time: mean data and step seconds, then the
operators that take the most of it (torch.profiler, CPU self time).

The step is the trainer's own: the task's model wrapped in :class:`spade.engine.trainer.LossGuard`
(under ``SOLVER.AMP.ENABLED`` bf16 autocast and the math attention kernel, as
``pretrain_net.py`` trains), the summed losses' backward and an AdamW step, on the task's own
batches (the UNet configs read their latent and segment caches; run after a chain filled them,
or the first steps encode and render). Weights are random (``MODEL.WEIGHTS ""``): the time does
not depend on their values. Options after the flags are config overrides, as in pretrain_net.py:

    CFG=configs/pretrain/unet_tiny_grounded5.yaml
    python benchmarks/profile_pretrain_step.py --config-file $CFG SOLVER.AMP.ENABLED True
    python benchmarks/profile_pretrain_step.py --config-file $CFG SOLVER.AMP.ENABLED True \
        PRETRAIN.UNET.GROUNDING_WEIGHT 0.0 PRETRAIN.UNET.GROUNDING_PIXEL_WEIGHT 0.0
"""

import argparse
import json
import os
import sys
import time
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def profile_steps(cfg, warmup: int, steps: int, top: int) -> dict:
    """Time ``steps`` training steps after ``warmup``, then profile ``steps`` more."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from spade.engine.trainer import LossGuard
    from spade.pretrain.engine import get_task

    if warmup < 0 or steps < 1:
        raise ValueError(f"--warmup must be >= 0 and --steps >= 1, got {warmup} and {steps}")
    task = get_task(cfg)
    amp = bool(cfg.SOLVER.AMP.ENABLED)
    model = LossGuard(task.build_model(cfg), autocast_dtype=torch.bfloat16 if amp else None)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(cfg.SOLVER.BASE_LR))
    batches = iter(task.batches(cfg))

    def step():
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        losses = model(batch)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t1

    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = [
        {
            "op": e.key,
            "calls": int(e.count),
            "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 2),
            "share": round(e.self_cpu_time_total / total, 4),
        }
        for e in events[:top]
    ]
    return {
        "batch": int(cfg.SOLVER.IMS_PER_BATCH),
        "amp": amp,
        "threads": torch.get_num_threads(),
        "data_s": round(sum(t[0] for t in times) / steps, 4),
        "step_s": round(sum(t[1] for t in times) / steps, 4),
        "ops": ops,
    }


def format_table(result: dict) -> str:
    head = (
        f"{result['config']}: batch {result['batch']}, amp {result['amp']}, "
        f"{result['threads']} threads: data {result['data_s']:.3f} s, step {result['step_s']:.3f} s"
    )
    rows = ["| op | calls | self ms / step | share |", "|---|---|---|---|"]
    rows += [
        f"| {o['op']} | {o['calls']} | {o['self_ms_per_step']:.1f} | {100 * o['share']:.1f} % |"
        for o in result["ops"]
    ]
    return head + "\n\n" + "\n".join(rows)


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps, then as many profiled")
    p.add_argument("--top", type=int, default=15, help="operators listed")
    p.add_argument("--out", default="", help="also write the result as JSON")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = p.parse_args(argv)

    from spade.pretrain.run import setup_pretrain_cfg

    cfg_args = argparse.Namespace(
        config_file=args.config_file, opts=["MODEL.WEIGHTS", "", *args.opts]
    )
    cfg = setup_pretrain_cfg(cfg_args, do_default_setup=False)
    result = {
        "config": os.path.basename(args.config_file),
        **profile_steps(cfg, args.warmup, args.steps, args.top),
    }
    print(format_table(result))
    if args.out:
        from spade.utils.io import atomic_write_bytes

        atomic_write_bytes(args.out, json.dumps(result, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
