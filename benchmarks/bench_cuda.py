#!/usr/bin/env python
"""SPADE per 512x512 image on a GPU: whole-model inference, one stage-2 training step, and the
stage-1 teacher maps; median seconds and peak memory, batch 1, random weights.

Presets (weights are random: nothing can be downloaded; the shapes are what is measured):
* ``sd15``: the paper's stage-2 configuration, configs/psg/spade_sd15_psg.yaml (full head: 100
  queries, 256-wide pixel / transformer decoders, relation head), with random models of Stable
  Diffusion 1.5's shapes built through the TINY preset path (bench_inference.SD15_OPTS: UNet
  (320, 640, 1280, 1280) x 2 layers, cross-attention 768; VAE (128, 256, 512, 512)) and a random
  open_clip ViT-L-14; LoRA on attn2 as the config says; image 512x512.
* ``tiny``: configs/synthetic/spade_tiny_synthpsg.yaml (the shipped miniature models), 128x128.
The vocabulary is SynthPSG's in both (the training data below is a SynthPSG image).

Modes, each per image at batch 1, after one warm-up run, ``--repeats`` timed runs:
* ``infer``: eval mode under no_grad, panoptic + scene-graph output (the whole forward);
* ``train``: one stage-2 step on a real SynthPSG image rendered at the size and mapped by the
  trainer's dataset mapper (large-scale jitter, crop; ground-truth masks and relations):
  forward in train mode, sum of the losses, backward, step of the trainer's optimizer
  (spade.engine.build_spade_optimizer: AdamW, full-model gradient clipping);
* ``teacher``: stage-1 teacher maps of that image (spade.calibration teacher_generator on the
  model's own UNet / VAE / CLIP text tower with LoRA disabled: VAE encode, BELM inversion, O-BELM
  sampling with cross-attention capture, role maps) for ``--teacher-triplets`` ground-truth
  triplets with ``--teacher-steps`` steps (2 x steps - 1 UNet passes of batch T).

Precision rows: ``fp32`` (on CUDA with TF32 matmuls: torch.backends.cuda.matmul.allow_tf32 = True;
cuDNN convolutions use TF32 by PyTorch's default) and ``bf16`` (torch.autocast(device,
bfloat16) around the forward, fp32 weights). Memory on CUDA: torch.cuda.max_memory_allocated
over the timed runs (weights included) and that minus what was allocated just before them; on CPU
the process RSS peak sampled every 5 ms and that minus the RSS before them. A failing row (e.g.
out of memory) records its error and the others still run. JSON (``--out``, run_all.py's schema:
{"rows": [...], meta}) and Markdown (``--markdown``) are rewritten atomically after every row,
so a killed run leaves what it measured.

    python benchmarks/bench_cuda.py --device cuda --presets sd15 --out bench_cuda.json \
        --markdown bench_cuda.md
    python benchmarks/bench_cuda.py --device cpu --presets tiny --repeats 1   # smoke test
"""

import time

_T_IMPORT = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Dict, Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench_backbone import RssPeak, _rss_bytes  # noqa: E402
from bench_inference import SD15_OPTS, TINY_CONFIG  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from run_all import machine, rows_to_markdown  # noqa: E402

import spade  # noqa: E402
from spade.calibration.builder import teacher_generator  # noqa: E402
from spade.calibration.teacher import load_calibration_image, triplet_names  # noqa: E402
from spade.config import add_spade_config  # noqa: E402
from spade.data.dataset_mapper import build_dataset_mapper  # noqa: E402
from spade.data.datasets.synthetic import register_synthpsg  # noqa: E402
from spade.data.synthpsg import generate_synthpsg  # noqa: E402
from spade.engine.optimizer import build_spade_optimizer  # noqa: E402
from spade.modeling.backbone import lora_disabled  # noqa: E402
from spade.modeling.backbone.loading import DiffusionParts  # noqa: E402
from spade.utils.io import atomic_write_bytes, atomic_write_json  # noqa: E402

spade.register_all()
IMPORT_S = time.perf_counter() - _T_IMPORT

SD15_CONFIG = os.path.join(ROOT, "configs", "psg", "spade_sd15_psg.yaml")
# the paper config names SD 1.5 / CLIP weights and a stage-1 output; build random models of the
# same shapes from the TINY path instead, in fp32 (bf16 rows autocast)
SD15_RANDOM_OPTS = SD15_OPTS + [  # SD15_OPTS already selects the TINY path (random weights)
    "MODEL.SPADE.DIFFUSION.DTYPE",
    "float32",
    "MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS",
    "",
]
# name -> (config file, default image side, config overrides)
PRESETS = {
    "tiny": (TINY_CONFIG, 128, []),
    "sd15": (SD15_CONFIG, 512, SD15_RANDOM_OPTS),
}
MODES = ("infer", "train", "teacher")
DTYPES = ("fp32", "bf16")
DATA_PREFIX = "bench_cuda_synthpsg"
GIB = 2**30


# --------------------------------------------------------------------------- device helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _precision(dtype: str, device: torch.device) -> str:
    if dtype == "bf16":
        return "bf16 autocast"
    return "fp32 (TF32 matmul)" if device.type == "cuda" else "fp32"


def _autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class MemoryPeak:
    """Peak memory of a block: CUDA allocator peak, or the sampled process RSS on CPU.

    ``peak``: bytes at the peak (weights included); ``extra``: ``peak`` minus the usage at entry.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = self.extra = 0

    def __enter__(self):
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            self._before = _rss_bytes()
            self._rss = RssPeak().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._rss.__exit__(*exc)
            self.peak = self._rss.peak
        self.extra = self.peak - self._before


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- model and data
def make_cfg(preset: str, size: int, device: str, data_root: str, teacher_steps: int):
    config, _, opts = PRESETS[preset]
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = device
    cfg.INPUT.IMAGE_SIZE = size
    cfg.DATASETS.TRAIN = (f"{DATA_PREFIX}_train",)
    cfg.DATASETS.TEST = (f"{DATA_PREFIX}_train",)
    cfg.DATASETS.SYNTHPSG.ROOT = data_root
    cfg.CALIBRATION.NUM_INFERENCE_STEPS = teacher_steps
    cfg.CALIBRATION.IMAGE_SIZE = size
    cfg.freeze()
    return cfg


def make_data(size: int, data_root: str) -> dict:
    """Render one SynthPSG image at ``size`` and register it (splits ``DATA_PREFIX_*``)."""
    generate_synthpsg(data_root, num_images=1, seed=0, size=size)  # image 0 is a training image
    register_synthpsg(data_root, prefix=DATA_PREFIX)
    return DatasetCatalog.get(f"{DATA_PREFIX}_train")[0]


def build(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)  # on cfg.MODEL.DEVICE
    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    model.set_vocabulary(meta.thing_classes + meta.stuff_classes, meta.predicate_classes)
    return model


def count_params(model) -> Dict[str, float]:
    """Parameters of the model plus its CLIP (held outside the module tree), in millions."""
    params = {id(p): p for p in model.parameters()}
    clip = getattr(getattr(model, "backbone", None), "clip", None)
    if clip is not None:
        params.update({id(p): p for p in clip.model.parameters()})
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_M": round(total / 1e6, 1), "trainable_M": round(trainable / 1e6, 2)}


# --------------------------------------------------------------------------- modes
def _timed(fn, repeats: int, device: torch.device):
    """Run ``fn`` once (warm-up), then ``repeats`` times; (seconds per run, memory, last out)."""
    fn()
    _sync(device)
    times = []
    with MemoryPeak(device) as mem:
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times, mem, out


def run_infer(ctx: dict, dtype: str, repeats: int):
    model, device = ctx["model"], ctx["device"]
    model.eval()
    batch = [ctx["infer_input"]]

    def fn():
        with torch.no_grad(), _autocast(dtype, device):
            return model(batch)[0]

    times, mem, out = _timed(fn, repeats, device)
    n_rel = int(out["relations"]["triplets"].shape[0]) if "relations" in out else 0
    segments = len(out["panoptic_seg"][1]) if "panoptic_seg" in out else 0
    return times, mem, f"segments {segments}, triplets {n_rel}"


def run_train(ctx: dict, dtype: str, repeats: int):
    model, device, cfg = ctx["model"], ctx["device"], ctx["cfg"]
    batch = [ctx["train_input"]]
    model.train()
    optimizer = build_spade_optimizer(cfg, model)
    losses_seen = []

    def fn():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(dtype, device):
            losses = model(batch)
        loss = sum(losses.values())
        loss.backward()
        optimizer.step()
        losses_seen.append(loss.detach())
        return len(losses)

    try:
        times, mem, n_terms = _timed(fn, repeats, device)
        loss = float(losses_seen[-1])
    finally:  # gradients go now, the optimizer state with this frame; measure() then releases
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return times, mem, f"loss {loss:.3g} ({n_terms} terms)"


def run_teacher(ctx: dict, dtype: str, repeats: int):
    model, device, cfg = ctx["model"], ctx["device"], ctx["cfg"]
    model.eval()
    bb = model.backbone
    parts = DiffusionParts(bb.vae, bb.unet, bb.scheduler, bb.latent_scale)
    gen = teacher_generator(
        cfg,
        parts,
        bb.clip,
        bb.unet,
        teacher_mode=functools.partial(lora_disabled, bb.unet),
        num_steps=ctx["teacher_steps"],
    )
    image, triplets = ctx["teacher_image"], ctx["teacher_triplets"]
    passes = [0]
    hook = bb.unet.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))

    def fn():
        with _autocast(dtype, device):
            maps = gen(image, triplets)
        if maps.shape[0] != len(triplets) or not bool(torch.isfinite(maps).all()):
            raise FloatingPointError(f"teacher maps {tuple(maps.shape)} not finite / wrong shape")
        return maps

    try:
        times, mem, _ = _timed(fn, repeats, device)
    finally:
        hook.remove()
    per_image = passes[0] // (repeats + 1)  # the warm-up and every timed run: one image each
    detail = f"{ctx['teacher_steps']} steps, T={len(triplets)}, {per_image} UNet passes"
    return times, mem, detail


RUNNERS = {"infer": run_infer, "train": run_train, "teacher": run_teacher}


# --------------------------------------------------------------------------- output
def render_markdown(payload: dict) -> str:
    m = payload
    status = "complete" if m["complete"] else "PARTIAL (still running, killed or failed)"
    lines = [
        f"## SPADE on {m['device_name']}: per image, batch 1 ({', '.join(m['presets'])})",
        "",
        f"Machine: {m['machine']}.",
        "",
        f"Command: `{m['command']}`",
        "",
        f"Status: {status}; {m['elapsed_s']:.0f} s since start (imports {m['import_s']:.0f} s"
        + "".join(f", build {k} {v:.1f} s" for k, v in m["build_s"].items())
        + ").",
        "",
        m["notes"],
        "",
        rows_to_markdown(m["rows"]),
    ]
    return "\n".join(lines)


def _notes(device: torch.device) -> str:
    cuda = device.type == "cuda"
    precision = (
        "fp32 rows use TF32 matmuls (torch.backends.cuda.matmul.allow_tf32 = True) and cuDNN TF32 "
        "convolutions; bf16 rows run under torch.autocast('cuda', torch.bfloat16)"
        if cuda
        else "fp32 rows are plain fp32; bf16 rows run under CPU autocast (torch.bfloat16)"
    )
    memory = (
        "torch.cuda.max_memory_allocated over the timed runs (weights included)"
        if cuda
        else "process RSS peak over the timed runs (sampled every 5 ms)"
    )
    return (
        "Random weights, batch 1, one warm-up then the median of the timed runs; "
        f"{precision}, weights in fp32. mem_peak_GiB: {memory}; mem_extra_GiB: that minus the "
        "usage just before them. train = forward + backward + optimizer step (SPADE's AdamW "
        "builder, full-model gradient clipping) on a SynthPSG image mapped by the training "
        "mapper; teacher = stage-1 teacher maps (VAE encode, BELM inversion, O-BELM sampling with "
        "cross-attention capture, LoRA off) for T ground-truth triplets."
    )


def write_outputs(args, payload: dict) -> None:
    if args.out:
        atomic_write_json(args.out, payload, indent=2)
    if args.markdown:
        atomic_write_bytes(args.markdown, render_markdown(payload).encode())


def _fmt_row(row: dict) -> str:
    head = f"{row['preset']:5} {row['mode']:7} {row['precision']:18}"
    if row.get("error"):
        return f"{head} ERROR {row['error']}"
    return (
        f"{head} {row['s_per_image']:9.4f} s/image (min {row['s_min']:.4f}), "
        f"mem peak {row['mem_peak_GiB']:.2f} GiB (+{row['mem_extra_GiB']:.2f}), "
        f"{row['detail']}"
    )


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--presets", nargs="+", default=["sd15"], choices=sorted(PRESETS))
    p.add_argument("--size", type=int, default=0, help="image side (0: 512 for sd15, 128 tiny)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=DTYPES,
        default=None,
        help="default: fp32 bf16 on CUDA, fp32 on CPU (bf16 there = CPU autocast)",
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--teacher-steps", type=int, default=10, help="inversion (= sampling) steps")
    p.add_argument("--teacher-triplets", type=int, default=2, help="T: triplets per image")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=0.0,
        help="skip rows not started within this many seconds of the start (0: no deadline)",
    )
    p.add_argument("--out", default="", help="JSON path ({'rows': [...], meta})")
    p.add_argument("--markdown", default="", help="Markdown section path")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.teacher_steps < 2:
        p.error("--teacher-steps must be >= 2 (the inversion grid needs two levels)")
    if args.teacher_triplets < 1:
        p.error("--teacher-triplets must be >= 1")
    return p, args


def main(argv=None) -> dict:
    start = time.perf_counter()
    parser, args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtypes = args.dtypes or (list(DTYPES) if device.type == "cuda" else ["fp32"])
    cli = sys.argv[1:] if argv is None else list(argv)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    payload = {
        "rows": [],
        "device": str(device),
        "device_name": device_name,
        "machine": machine(),
        "command": shlex.join(["python", "benchmarks/bench_cuda.py", *cli]),
        "presets": list(args.presets),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "tf32_matmul": bool(device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32),
        "cudnn_tf32": bool(device.type == "cuda" and torch.backends.cudnn.allow_tf32),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "teacher_steps": args.teacher_steps,
        "teacher_triplets": args.teacher_triplets,
        "import_s": round(IMPORT_S, 2),
        "build_s": {},
        "model_GiB": {},
        "elapsed_s": 0.0,
        "complete": False,
        "configs": {p: os.path.relpath(PRESETS[p][0], ROOT) for p in args.presets},
        "notes": _notes(device),
    }
    print(f"device {device} ({device_name}); imports {IMPORT_S:.1f} s", flush=True)

    def finish_row(row: dict) -> None:
        payload["rows"].append(row)
        payload["elapsed_s"] = round(time.perf_counter() - start, 1)
        print(_fmt_row(row), flush=True)
        write_outputs(args, payload)

    def over_deadline() -> bool:
        return args.deadline_s > 0 and time.perf_counter() - start > args.deadline_s

    for preset in args.presets:
        size = args.size or PRESETS[preset][1]
        base = {"preset": preset, "image": f"{size}x{size}", "batch": 1}
        ctx: Optional[dict] = None
        build_error = ""
        if over_deadline():
            build_error = f"skipped: --deadline-s {args.deadline_s:g} reached"
        else:
            try:
                ctx = prepare(preset, size, device, args, payload)
            except Exception as e:  # noqa: BLE001  (recorded in every row of the preset)
                build_error = f"build failed: {type(e).__name__}: {_short(e)}"
                _release(device)
        for mode in args.modes:
            for dtype in dtypes:
                row = {**base, "mode": mode, "precision": _precision(dtype, device)}
                if build_error or over_deadline():
                    msg = build_error or f"skipped: --deadline-s {args.deadline_s:g} reached"
                    finish_row({**row, "error": msg})
                    continue
                finish_row(measure(ctx, mode, dtype, args.repeats, row))
        if ctx is not None:
            ctx["tmp"].cleanup()
            del ctx
            _release(device)
    payload["elapsed_s"] = round(time.perf_counter() - start, 1)
    payload["complete"] = True
    write_outputs(args, payload)
    print()
    print(rows_to_markdown(payload["rows"]), end="")
    print(
        f"total {payload['elapsed_s']:.1f} s (+ imports {IMPORT_S:.1f} s)"
        + (f"; wrote {args.out}" if args.out else "")
        + (f", {args.markdown}" if args.markdown else ""),
        flush=True,
    )
    return payload


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def prepare(preset: str, size: int, device: torch.device, args, payload: dict) -> dict:
    """Build the model and its inputs (rendered SynthPSG image, mapped for train and test)."""
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_cuda_")
    try:
        record = make_data(size, tmp.name)
        cfg = make_cfg(preset, size, str(device), tmp.name, args.teacher_steps)
        model = build(cfg)
        np.random.seed(0)  # detectron2's augmentations draw from numpy's global RNG
        random.seed(0)
        train_input = build_dataset_mapper(cfg, is_train=True)(dict(record))
        test_input = build_dataset_mapper(cfg, is_train=False)(dict(record))
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        names = meta.thing_classes + meta.stuff_classes
        triplets = triplet_names(record, names, meta.predicate_classes, args.teacher_triplets)
        if not triplets:
            raise ValueError("the rendered SynthPSG image has no relations")
        triplets = [triplets[i % len(triplets)] for i in range(args.teacher_triplets)]
        image, _ = load_calibration_image(record["file_name"], size)
    except BaseException:
        tmp.cleanup()
        raise
    _sync(device)
    build_s = time.perf_counter() - t0
    payload["build_s"][preset] = round(build_s, 1)
    if device.type == "cuda":
        payload["model_GiB"][preset] = round(torch.cuda.memory_allocated(device) / GIB, 2)
    params = count_params(model)
    inst = train_input["instances"]
    print(
        f"{preset}: built in {build_s:.1f} s, {params['params_M']} M parameters "
        f"({params['trainable_M']} M trainable); train sample {len(inst)} segments, "
        f"{len(train_input['gt_relations'])} relations; teacher triplets {triplets}",
        flush=True,
    )
    return {
        "tmp": tmp,
        "cfg": cfg,
        "model": model,
        "device": device,
        "params": params,
        "infer_input": {k: test_input[k] for k in ("image", "height", "width")},
        "train_input": train_input,
        "teacher_image": image,
        "teacher_triplets": triplets,
        "teacher_steps": args.teacher_steps,
    }


def measure(ctx: dict, mode: str, dtype: str, repeats: int, row: dict) -> dict:
    device = ctx["device"]
    torch.manual_seed(0)
    try:
        times, mem, detail = RUNNERS[mode](ctx, dtype, repeats)
    except Exception as e:  # noqa: BLE001  (OOM or anything else: recorded, next row runs)
        ctx["model"].eval()
        ctx["model"].zero_grad(set_to_none=True)
        return {**row, "error": f"{type(e).__name__}: {_short(e)}"}
    finally:
        _release(device)
    sec = statistics.median(times)
    return {
        **row,
        "s_per_image": round(sec, 4),
        "s_min": round(min(times), 4),
        "images_per_s": round(1.0 / sec, 3),
        "mem_peak_GiB": round(mem.peak / GIB, 3),
        "mem_extra_GiB": round(mem.extra / GIB, 3),
        **ctx["params"],
        "repeats": repeats,
        "detail": detail,
    }


if __name__ == "__main__":
    main()
