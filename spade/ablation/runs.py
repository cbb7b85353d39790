"""Runs of an ablation study: the real entry points as subprocesses, cached by a config hash.

A :class:`Run` is one call of ``calibrate_net.py`` (stage 1), ``train_net.py`` (stage 2: train,
then detectron2's EvalHook evaluates the final model) or ``train_net.py --eval-only`` (a trained
stage-2 model evaluated with other test-time settings). Its key is the SHA-256 of its kind and its
*full* merged config (detectron2 defaults + add_spade_config + the YAML + the opts), with the
study folder written as ``@root`` and OUTPUT_DIR left out, plus the manifests (weight hashes) of
the foundation-model folders it names: any config value or shipped weight changes the key, nothing
else does. Runs that feed others name them through their folder (stage 2's
CALIBRATED_WEIGHTS, an evaluation's MODEL.WEIGHTS), and a folder name holds its run's key, so a
changed stage 1 changes every key downstream of it.

A run lives in ``<root>/runs/<kind>-<key[:16]>/``; ``done.json`` (written atomically, last) marks
it complete and holds what the study reads back (metrics, seconds per image, trainable
parameters, wall time). An interrupted run is continued with ``--resume``; a complete one is
never run again.
"""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from spade.evaluation.report import write_json_atomic

__all__ = ["Run", "RunExecutor", "full_config", "run_key"]

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY_POINTS = {
    "stage1": "projects/SPADE/calibrate_net.py",
    "stage2": "projects/SPADE/train_net.py",
    "eval": "projects/SPADE/train_net.py",
}
DONE = "done.json"
MANIFEST = "spade_manifest.json"


@dataclass(frozen=True)
class Run:
    """One entry-point call. ``parent``: the run whose output this one loads (stage 1 for a
    stage 2, stage 2 for an evaluation); ``opts`` are detectron2 ``KEY VALUE`` overrides."""

    kind: str
    config_file: str
    opts: Tuple[str, ...] = ()
    parent: Optional["Run"] = None

    def __post_init__(self):
        if self.kind not in ENTRY_POINTS:
            raise ValueError(f"Run.kind must be one of {sorted(ENTRY_POINTS)}, got {self.kind!r}")
        if len(self.opts) % 2:
            raise ValueError(f"Run opts must be KEY VALUE pairs, got {list(self.opts)}")
        if self.kind == "eval" and (self.parent is None or self.parent.kind != "stage2"):
            raise ValueError("an eval run needs the stage-2 run it evaluates as parent")


def _resolve(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def full_config(run: Run, root: str):
    """The merged detectron2 config of ``run`` (frozen), its parent's output wired in."""
    from detectron2.config import get_cfg

    import spade
    from spade.config import add_spade_config
    from spade.engine.defaults import merge_config

    spade.register_all()
    cfg = get_cfg()
    add_spade_config(cfg)
    merge_config(cfg, _resolve(run.config_file), list(_wired_opts(run, root)))
    cfg.freeze()
    return cfg


def _wired_opts(run: Run, root: str) -> List[str]:
    opts = list(run.opts)
    if run.kind == "eval" and run.parent is not None and run.parent.parent is not None:
        # the evaluated model's own stage 1 (its provenance record names it)
        opts = _wired_opts(run.parent, root)[len(run.parent.opts) :] + opts
    if run.parent is not None:
        weights = os.path.join(run_dir(run.parent, root), "model_final.safetensors")
        key = "MODEL.WEIGHTS" if run.kind == "eval" else "MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS"
        opts += [key, weights]
    return opts


_KEYS: Dict[Tuple[Run, str], str] = {}
_KEYS_LOCK = threading.Lock()


def run_key(run: Run, root: str) -> str:
    """SHA-256 (hex) of the run's kind and full config, ``root`` written as ``@root``."""
    root = os.path.abspath(root)
    with _KEYS_LOCK:
        if (run, root) in _KEYS:
            return _KEYS[(run, root)]
    cfg = full_config(run, root).clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = ""
    text = cfg.dump().replace(root, "@root") + _weights_identity(cfg)
    key = hashlib.sha256(f"{run.kind}\n{text}".encode()).hexdigest()
    with _KEYS_LOCK:
        _KEYS[(run, root)] = key
    return key


def _weights_identity(cfg) -> str:
    """The manifests (with the SHA-256 of every weight file) of the foundation-model folders the
    config loads: new shipped weights under the same path are a new run."""
    from spade.modeling.backbone.loading import resolve_weights_path

    parts = []
    for path in (cfg.MODEL.SPADE.DIFFUSION.PRETRAINED, cfg.MODEL.SPADE.CLIP.PRETRAINED):
        folder = resolve_weights_path(path)
        found = []
        if os.path.isdir(folder):
            for dirpath, _, files in sorted(os.walk(folder)):
                found += [os.path.join(dirpath, f) for f in files if f == MANIFEST]
        for manifest in sorted(found):
            with open(manifest, "rb") as f:
                parts.append(hashlib.sha256(f.read()).hexdigest())
    return "\n# weights " + " ".join(parts)


def run_dir(run: Run, root: str) -> str:
    return os.path.join(os.path.abspath(root), "runs", f"{run.kind}-{run_key(run, root)[:16]}")


def _command(run: Run, root: str, out_dir: str) -> List[str]:
    cmd = [sys.executable, os.path.join(ROOT, ENTRY_POINTS[run.kind])]
    cmd += ["--config-file", _resolve(run.config_file)]
    cmd += ["--eval-only"] if run.kind == "eval" else ["--resume"]
    return cmd + _wired_opts(run, root) + ["OUTPUT_DIR", out_dir]


_PARAMS = re.compile(r"Trainable parameters: (\d+)")
_LCAL = re.compile(r"Held-out L_cal: ([0-9.eE+-]+|nan) over (\d+) triplets")
_SPEED = re.compile(r"Total inference pure compute time: \S+ \(([0-9.]+) s / iter per device")


def _last_match(pattern, text: str) -> Optional[str]:
    found = pattern.findall(text)
    return found[-1] if found else None


def collect(run: Run, root: str, out_dir: str, log_text: str, wall_s: float) -> Dict:
    """What the study keeps of a finished run (see the module doc); errors name the folder."""
    result: Dict = {"kind": run.kind, "wall_s": wall_s}
    params = _last_match(_PARAMS, log_text)
    if run.kind in ("stage1", "stage2"):
        final = os.path.join(out_dir, "model_final.safetensors")
        if not os.path.isfile(final):
            raise RuntimeError(f"{out_dir}: the run ended without model_final.safetensors")
        result["trainable_params"] = int(params) if params else None
    if run.kind == "stage1":
        result.update(_heldout(log_text))
    if run.kind in ("stage2", "eval"):
        cfg = full_config(run, root)
        dataset = cfg.DATASETS.TEST[0]
        path = os.path.join(out_dir, "inference", dataset, "psg_evaluation.json")
        if not os.path.isfile(path):
            raise RuntimeError(f"{out_dir}: no evaluation result {path}")
        with open(path) as f:
            metrics = json.load(f)
        result["psg"] = metrics.get("psg", {})
        result["panoptic_seg"] = metrics.get("panoptic_seg", {})
        speed = _last_match(_SPEED, log_text)
        result["s_per_image"] = float(speed) if speed else float("nan")
    return result


def _heldout(log_text: str) -> Dict:
    """Stage 1's last held-out L_cal (and its triplet count) from its log, if it printed one."""
    found = _LCAL.findall(log_text)
    if not found:
        return {}
    value, count = found[-1]
    return {"heldout_loss_cal": float(value), "heldout_triplets": int(count)}


class RunExecutor:
    """Runs (or reads back) :class:`Run` s under ``root``, ``jobs`` at a time.

    On a machine with GPUs each concurrent run gets one (CUDA_VISIBLE_DEVICES); on a CPU the cores
    are split among the concurrent runs (OMP_NUM_THREADS). ``progress(message)`` is called as runs
    start and finish.
    """

    def __init__(
        self,
        root: str,
        jobs: int = 1,
        gpus: Sequence[int] = (),
        threads: int = 0,
        progress: Callable[[str], None] = print,
    ):
        self.root = os.path.abspath(root)
        self.jobs = max(1, int(jobs))
        self.gpus = list(gpus)
        cores = os.cpu_count() or 1
        self.threads = threads or max(1, cores // self.jobs)
        self.progress = progress
        self._free_gpus = list(self.gpus)
        self._lock = threading.Lock()
        self.ran: List[Run] = []

    def cached(self, run: Run) -> Optional[Dict]:
        folder = run_dir(run, self.root)
        path = os.path.join(folder, DONE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            result = json.load(f)
        if run.kind == "stage1" and "heldout_loss_cal" not in result:
            # results of a driver that did not read it yet: from the run's own log
            log = os.path.join(folder, "run.log")
            if os.path.isfile(log):
                with open(log) as f:
                    result.update(_heldout(f.read()))
        return result

    def run_all(self, runs: Sequence[Run]) -> Dict[Run, Dict]:
        """Every run of ``runs`` (parents first, level by level), results by run."""
        results: Dict[Run, Dict] = {}
        levels = {"stage1": 0, "stage2": 1, "eval": 2}
        unique = list(dict.fromkeys(runs))
        for level in range(3):
            batch = [r for r in unique if levels[r.kind] == level]
            todo = [r for r in batch if self.cached(r) is None]
            for r in batch:
                if r not in todo:
                    results[r] = self.cached(r)
            if todo:
                self.progress(
                    f"{len(todo)} {list(levels)[level]} run(s) to do ({self.jobs} at once)"
                )
            with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                for r, res in zip(todo, pool.map(self.run_one, todo)):
                    results[r] = res
        return results

    def run_one(self, run: Run) -> Dict:
        done = self.cached(run)
        if done is not None:
            return done
        out_dir = run_dir(run, self.root)
        os.makedirs(out_dir, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(self.threads))
        gpu = None
        if self.gpus:
            with self._lock:
                gpu = self._free_gpus.pop(0)
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        cmd = _command(run, self.root, out_dir)
        log_path = os.path.join(out_dir, "run.log")
        start = time.time()
        self.progress(f"start  {os.path.basename(out_dir)}  {run.config_file} {' '.join(run.opts)}")
        try:
            with open(log_path, "a") as log:
                log.write("$ " + " ".join(cmd) + "\n")
                log.flush()
                rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        finally:
            if gpu is not None:
                with self._lock:
                    self._free_gpus.append(gpu)
        wall = time.time() - start
        if rc != 0:
            raise RuntimeError(f"{run.kind} run failed (exit {rc}); see {log_path}")
        with open(log_path) as f:
            text = f.read()
        result = collect(run, self.root, out_dir, text, wall)
        write_json_atomic(result, os.path.join(out_dir, DONE))
        with self._lock:
            self.ran.append(run)
        self.progress(f"done   {os.path.basename(out_dir)}  in {wall / 60:.1f} min")
        return result
