"""Reporting of evaluation results: text table, atomic JSON file, per-predicate recall chart."""

import json
import os
import tempfile
from typing import Dict, Mapping, Optional

import numpy as np

HEADLINE = ("R@20", "R@50", "R@100", "mR@20", "mR@50", "mR@100")


def _clean(x):
    """JSON-safe copy: nan/inf -> None, numpy scalars -> Python numbers."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json_atomic(obj, path: str, indent: Optional[int] = 1) -> None:
    """Write ``obj`` as JSON (nan as null) via a temporary file in the same folder + os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj), f, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Two-column text table: the six headline rows first (labelled exactly R@20 ... mR@100),
    then every other metric, one task after another (per-predicate "-" rows left out)."""
    lines = []
    for task, metrics in results.items():
        lines.append(f"[{task}]")
        keys = [k for k in HEADLINE if k in metrics]
        keys += [k for k in metrics if k not in HEADLINE and "-" not in k]
        width = max([len(k) for k in keys] + [6])
        lines.append(f"{'metric':<{width}} | value")
        lines.append("-" * (width + 10))
        for k in keys:
            v = metrics[k]
            text = "nan" if v is None or not np.isfinite(v) else f"{v:.2f}"
            if k.startswith("num_"):
                text = "nan" if v is None or not np.isfinite(v) else str(int(v))
            lines.append(f"{k:<{width}} | {text}")
    return "\n".join(lines)


def format_per_predicate(per_predicate: Mapping[str, Mapping[str, float]]) -> str:
    """Per-predicate recall table: one row per predicate, one column per K, plus triplet count."""
    if not per_predicate:
        return ""
    cols = list(next(iter(per_predicate.values())).keys())
    width = max(len(n) for n in per_predicate) + 1
    lines = [f"{'predicate':<{width}}" + "".join(f"{c:>14}" for c in cols)]
    for name, row in per_predicate.items():
        cells = []
        for c in cols:
            v = row[c]
            if c == "num_triplets":
                cells.append(f"{int(v):>14d}")
            else:
                cells.append(f"{'nan':>14}" if not np.isfinite(v) else f"{v:>14.2f}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def plot_per_predicate(per_predicate: Dict[str, Dict[str, float]], key: str, path: str) -> None:
    """Bar chart PNG of per-predicate recall ``key`` (e.g. "R@100"); absent predicates hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_predicate)
    values = np.array([per_predicate[n][key] for n in names], dtype=float)
    absent = ~np.isfinite(values)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(names) + 2), 4))
    bars = ax.bar(np.arange(len(names)), np.nan_to_num(values), color="tab:blue")
    for bar, a in zip(bars, absent):
        if a:
            bar.set_hatch("//")
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel(f"{key} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Per-predicate {key}")
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


CURVE_KEYS = ("psg/R@50", "psg/mR@50", "panoptic_seg/PQ", "panoptic_seg/PQ_th")


def read_learning_curve(metrics_json: str, keys=CURVE_KEYS) -> Dict[str, list]:
    """``{key: [(iteration, value), ...]}`` of the evaluations in a detectron2 ``metrics.json``
    (one JSON object per line, as JSONWriter writes it; a torn last line of a killed run is
    skipped, any other bad line is a ValueError naming the file and the line)."""
    curves: Dict[str, list] = {k: [] for k in keys}
    with open(metrics_json) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if n == len(lines):
                break
            raise ValueError(f"{metrics_json}: line {n} is not JSON") from None
        for k in keys:
            v = row.get(k)
            if v is not None and "iteration" in row:
                curves[k].append((int(row["iteration"]) + 1, float(v)))
    return curves


def plot_learning_curve(
    metrics_json: str,
    path: str,
    title: str = "",
    final: Optional[Mapping[str, Mapping[str, float]]] = None,
    final_iteration: int = 0,
) -> Optional[str]:
    """PNG of val R@50 / mR@50 / PQ / PQ_th against training iterations (the periodic
    evaluations of ``metrics_json``, plus ``final``: an evaluator result {task: {metric}} at
    ``final_iteration``, e.g. the evaluation after training, which detectron2 does not write to
    metrics.json); None when there is no point at all. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_learning_curve(metrics_json)
    for key in curves:
        task, name = key.split("/", 1)
        value = (final or {}).get(task, {}).get(name)
        if value is not None and final_iteration > 0:
            curves[key] = [p for p in curves[key] if p[0] != final_iteration]
            curves[key].append((final_iteration, float(value)))
    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ys = [y if np.isfinite(y) else np.nan for y in ys]
            ax.plot(xs, ys, marker="o", label=key.split("/", 1)[1])
    ax.set_xlabel("iteration")
    ax.set_ylabel("percent")
    ax.set_title(title or "validation metrics during training", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
