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

``PRETRAIN.COMPILE`` is honoured as the trainer honours it (the warm-up steps then include the
compilation). ``--ab-compile`` instead trains two copies of the model from the same weights, one
eager and one compiled (``PRETRAIN.COMPILE on``), on the same batches, their steps interleaved
(so that the machine's drift falls on both alike), and prints the median step of each, the
speed-up, how far their losses drift apart and the cosine of their two weight updates:

    python benchmarks/profile_pretrain_step.py --config-file $CFG --ab-compile --steps 20 \
        SOLVER.AMP.ENABLED True
"""

import argparse
import json
import os
import statistics
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

    from spade.pretrain.engine import get_task

    _check_steps(warmup, steps)
    task = get_task(cfg)
    amp = bool(cfg.SOLVER.AMP.ENABLED)
    train_step = _trainer_step(cfg, task.build_model(cfg), str(cfg.PRETRAIN.COMPILE))
    batches = iter(task.batches(cfg))

    def step():
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        train_step(batch)
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


def _check_steps(warmup: int, steps: int) -> None:
    if warmup < 0 or steps < 1:
        raise ValueError(f"--warmup must be >= 0 and --steps >= 1, got {warmup} and {steps}")


def _trainer_step(cfg, net, compile_mode: str):
    """``step(batch) -> {loss: float}``: ``net`` compiled per ``compile_mode`` and wrapped as the
    trainer wraps it (LossGuard, bf16 autocast under SOLVER.AMP.ENABLED), with AdamW."""
    import torch

    from spade.engine.trainer import LossGuard
    from spade.pretrain.engine import compile_network

    compile_network(net, compile_mode, str(cfg.MODEL.DEVICE))
    amp = bool(cfg.SOLVER.AMP.ENABLED)
    model = LossGuard(net, autocast_dtype=torch.bfloat16 if amp else None)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(cfg.SOLVER.BASE_LR))

    def step(batch) -> dict:
        losses = model(batch)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in losses.items()}

    return step


def ab_compile(cfg, warmup: int, steps: int) -> dict:
    """Eager against compiled, interleaved on the same batches from the same weights (module
    doc): median step seconds after ``warmup`` (the compiled copy compiles in its first step),
    the largest relative difference of any logged loss over all steps, and the cosine and
    relative difference of the two copies' whole weight updates."""
    import torch

    from spade.pretrain.engine import get_task

    _check_steps(warmup, steps)
    task = get_task(cfg)
    nets = {"eager": task.build_model(cfg), "compiled": task.build_model(cfg)}
    nets["compiled"].load_state_dict(nets["eager"].state_dict())
    start = {k: v.detach().clone() for k, v in nets["eager"].state_dict().items()}
    train = {
        "eager": _trainer_step(cfg, nets["eager"], "off"),
        "compiled": _trainer_step(cfg, nets["compiled"], "on"),
    }
    batches = iter(task.batches(cfg))
    times = {"eager": [], "compiled": []}
    drift = 0.0
    for i in range(warmup + steps):
        batch = next(batches)
        losses = {}
        for name in ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager"):
            t0 = time.perf_counter()
            losses[name] = train[name](batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
        for key, value in losses["eager"].items():
            drift = max(drift, abs(losses["compiled"][key] - value) / max(abs(value), 1e-12))
    updates = {
        name: torch.cat(
            [(net.state_dict()[k].float() - v.float()).flatten() for k, v in start.items()]
        )
        for name, net in nets.items()
    }
    norm = float(updates["eager"].norm()) or 1.0
    eager_s, compiled_s = (statistics.median(times[n]) for n in ("eager", "compiled"))
    return {
        "batch": int(cfg.SOLVER.IMS_PER_BATCH),
        "amp": bool(cfg.SOLVER.AMP.ENABLED),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "eager_step_s": round(eager_s, 4),
        "compiled_step_s": round(compiled_s, 4),
        "speedup": round(eager_s / compiled_s, 3),
        "max_loss_rel_diff": float(f"{drift:.3g}"),
        "update_cosine": round(
            float(torch.nn.functional.cosine_similarity(updates["eager"], updates["compiled"], 0)),
            6,
        ),
        "update_rel_diff": float(
            f"{float((updates['compiled'] - updates['eager']).norm()) / norm:.3g}"
        ),
    }


def format_ab(result: dict) -> str:
    return (
        f"{result['config']}: batch {result['batch']}, amp {result['amp']}, "
        f"{result['threads']} threads, {result['steps']} interleaved steps\n\n"
        "| eager s / step | compiled s / step | speed-up | largest loss difference "
        "| update cosine | update difference |\n|---|---|---|---|---|---|\n"
        f"| {result['eager_step_s']:.3f} | {result['compiled_step_s']:.3f} | "
        f"{result['speedup']:.2f}x | {100 * result['max_loss_rel_diff']:.3g} % | "
        f"{result['update_cosine']:.6f} | {100 * result['update_rel_diff']:.3g} % |"
    )


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
    p.add_argument(
        "--ab-compile",
        action="store_true",
        help="time eager against compiled, interleaved (no profile)",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = p.parse_args(argv)

    from spade.pretrain.run import setup_pretrain_cfg

    cfg_args = argparse.Namespace(
        config_file=args.config_file, opts=["MODEL.WEIGHTS", "", *args.opts]
    )
    cfg = setup_pretrain_cfg(cfg_args, do_default_setup=False)
    config = os.path.basename(args.config_file)
    if args.ab_compile:
        result = {"config": config, **ab_compile(cfg, args.warmup, args.steps)}
        print(format_ab(result))
    else:
        result = {"config": config, **profile_steps(cfg, args.warmup, args.steps, args.top)}
        print(format_table(result))
    if args.out:
        from spade.utils.io import atomic_write_bytes

        atomic_write_bytes(args.out, json.dumps(result, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
