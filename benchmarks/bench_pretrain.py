#!/usr/bin/env python
"""Seconds per iteration of every stage-0 pretraining config, fp32 against mixed precision.

Each config runs the way ``make pretrain`` runs it (``projects/SPADE/pretrain_net.py`` in a
subprocess with the thread count ``make pretrain`` gives it), for ``--iters`` iterations into a
temporary folder (continuations start from random weights: ``MODEL.WEIGHTS ""``; the speed does
not depend on the values), once with ``SOLVER.AMP.ENABLED False`` and once ``True`` (bf16
autocast on the CPU, fp16 with a grad scaler on CUDA). The speed is detectron2's own ``time``
(the median over the last 20 iterations of ``metrics.json``, so the first iterations, which
build caches, do not count). ``projected_min`` multiplies it by the config's ``SOLVER.MAX_ITER``.

Threads: CLIP, its region fine-tune and the VAE run on one core each in ``make pretrain`` (CLIP's
chain beside the VAE), so they are measured on one thread here, but alone: beside each other
they run slower (memory bandwidth); the decoder fine-tune and the UNet runs take both cores.

The UNet configs read their ``PRETRAIN.UNET.LATENT_CACHE`` (the chain's one cache of VAE
latents) as ``make pretrain`` does: in the chain ``unet_tiny`` builds it over its first epoch and
the continuations find it complete, so measure the continuations after a ``unet_tiny`` run (or
any run that filled the cache) to get their speed in the chain. The same holds for the grounding
runs' ``PRETRAIN.UNET.SEGMENT_CACHE`` (the corpus's segment label maps), which the first of them
fills. The table says how full each cache was. The speed-up of bf16 depends on the CPU's bf16
units (AMX, AVX-512-BF16), which the table's header names with the CPU model: these machines
differ from session to session.

    python benchmarks/bench_pretrain.py --out bench_pretrain.json
    python benchmarks/bench_pretrain.py --configs vae_tiny unet_tiny --iters 40
    python benchmarks/bench_pretrain.py --precision amp --configs unet_tiny_grounded2 --iters 40
    python benchmarks/bench_pretrain.py --precision amp --compile off --configs unet_tiny

``--compile`` sets ``PRETRAIN.COMPILE`` in every run (default: each config's own; the UNet configs
compile where a C++ compiler is found). The compilation happens in a run's first step, so the
median over the last 20 iterations leaves it out. For eager against compiled on the same batches,
``benchmarks/profile_pretrain_step.py --ab-compile`` is the finer measure.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# config -> threads make pretrain gives it
CONFIGS = {
    "clip_tiny": 1,
    "clip_tiny_region": 1,
    "vae_tiny": 1,
    "vae_tiny_decoder": 2,
    "unet_tiny": 2,
    "unet_tiny_grounded": 2,
    "unet_tiny_grounded2": 2,
    "unet_tiny_grounded3": 2,
    "unet_tiny_grounded4": 2,
    "unet_tiny_grounded5": 2,
    "unet_tiny_grounded_condensed": 2,
    "unet_tiny_grounded_condensed2": 2,
}

# the runs of the CPU `make pretrain`, in its order (Makefile; PRETRAIN_UNET_RUNS' default chain)
CPU_CHAIN = ["clip_tiny", "clip_tiny_region", "vae_tiny", "vae_tiny_decoder", "unet_tiny"]
CPU_CHAIN += ["unet_tiny_grounded_condensed", "unet_tiny_grounded_condensed2"]


def pretrain_cfg(name: str, opts=()):
    """configs/pretrain/<name>.yaml with ``opts`` merged, as pretrain_net.py reads it."""
    from detectron2.config import get_cfg

    from spade.pretrain import add_pretrain_config

    cfg = get_cfg()
    add_pretrain_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "pretrain", f"{name}.yaml"))
    cfg.merge_from_list(list(opts))
    return cfg


def cpu_description() -> str:
    """The CPU's model name and its bf16 matrix units, from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    units = [u for u in ("amx_bf16", "avx512_bf16") if u in flags]
    return f"{model} ({', '.join(units) if units else 'no bf16 units listed'})"


def cache_fills(name: str, root: str = ROOT) -> dict:
    """How full the config's UNet caches under ``root`` are now: {"latent": "100 %", "segment":
    "empty"}, each where the config reads that cache (the segment cache: the grounding runs)."""
    import numpy as np

    cfg = pretrain_cfg(name)
    if cfg.PRETRAIN.TASK != "unet":
        return {}
    u = cfg.PRETRAIN.UNET
    paths = {"latent": u.LATENT_CACHE}
    if u.GROUNDING_WEIGHT > 0 or u.GROUNDING_PIXEL_WEIGHT > 0:
        paths["segment"] = u.SEGMENT_CACHE
    fills = {}
    for kind, path in paths.items():
        if not path:  # "" = a cache of the run's own in OUTPUT_DIR, which starts empty
            fills[kind] = "empty"
            continue
        done = os.path.join(root, f"{path}.done")
        if not os.path.isfile(done):
            fills[kind] = "empty"
            continue
        fills[kind] = f"{100.0 * float(np.load(done, mmap_mode='r').mean()):.0f} %"
    return fills


def pretrain_command(name: str, amp: bool, iters: int, out: str, compile_mode: str) -> list:
    """The pretrain_net.py command line of one measured run (``compile_mode`` "config": the
    config's own PRETRAIN.COMPILE)."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "projects", "SPADE", "pretrain_net.py"),
        "--config-file", os.path.join(ROOT, "configs", "pretrain", f"{name}.yaml"),
        "--skip-gates",
        "SOLVER.AMP.ENABLED", str(amp),
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.CHECKPOINT_PERIOD", str(10 * iters),
        "MODEL.WEIGHTS", "",
        "OUTPUT_DIR", out,
        "PRETRAIN.EXPORT_DIR", os.path.join(out, "export"),
    ]  # fmt: skip
    if compile_mode != "config":
        cmd += ["PRETRAIN.COMPILE", compile_mode]
    return cmd


def seconds_per_iteration(
    name: str, amp: bool, iters: int, threads: int, work: str, compile_mode: str = "config"
) -> float:
    out = os.path.join(work, f"{name}_{'amp' if amp else 'fp32'}")
    cmd = pretrain_command(name, amp, iters, out, compile_mode)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = os.path.join(work, f"{os.path.basename(out)}.log")
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"{name} (AMP {amp}) failed with exit {rc}; see {log}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    times = [r["time"] for r in rows if "time" in r]
    if not times:
        raise RuntimeError(f"{name}: {out}/metrics.json has no 'time' row; raise --iters")
    return float(times[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=CPU_CHAIN)
    p.add_argument("--iters", type=int, default=40, help="iterations per run (>= 21)")
    p.add_argument(
        "--precision",
        choices=("both", "fp32", "amp"),
        default="both",
        help="measure fp32, mixed precision (SOLVER.AMP.ENABLED True) or both",
    )
    p.add_argument(
        "--compile",
        choices=("config", "off", "on", "auto"),
        default="config",
        help="PRETRAIN.COMPILE of every run (config: each config's own)",
    )
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    cpu = cpu_description()
    print(
        f"{device}; CPU {cpu}; torch {torch.__version__}; {a.iters} iterations per run; "
        f"PRETRAIN.COMPILE {a.compile}"
    )
    kinds = {"both": (False, True), "fp32": (False,), "amp": (True,)}[a.precision]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as work:
        for name in a.configs:
            cfg = pretrain_cfg(name)
            threads, n = CONFIGS[name], int(cfg.SOLVER.MAX_ITER)
            compile_mode = str(cfg.PRETRAIN.COMPILE) if a.compile == "config" else a.compile
            r = {"config": name, "threads": threads, "max_iter": n, "compile": compile_mode}
            fills = cache_fills(name)
            for kind, fill in fills.items():
                r[f"{kind}_cache_at_start"] = fill
            line = f"{name:22} {threads} thr {n:5d} it"
            for amp in kinds:
                key = "amp" if amp else "fp32"
                sec = seconds_per_iteration(name, amp, a.iters, threads, work, a.compile)
                r[f"{key}_s_per_it"] = round(sec, 3)
                r[f"{key}_projected_min"] = round(sec * n / 60, 1)
                line += f"  {key} {sec:6.3f} s/it ({r[f'{key}_projected_min']:6.1f} min)"
            if len(kinds) == 2:
                r["speedup"] = round(r["fp32_s_per_it"] / r["amp_s_per_it"], 2)
                line += f"  x{r['speedup']:.2f}"
            if fills:
                at_start = ", ".join(f"{kind} cache {fill}" for kind, fill in fills.items())
                line += f"  (at start: {at_start})"
            rows.append(r)
            print(line, flush=True)
    info = {
        "torch": torch.__version__,
        "device": device,
        "amp": "fp16 autocast + grad scaler" if device != "cpu" else "bf16 autocast",
        "cpu": cpu,
        "iterations_per_run": a.iters,
        "rows": rows,
    }
    if a.out:
        from spade.utils.io import atomic_write_json

        atomic_write_json(a.out, info, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
