"""Shape rasterisation and stuff layout of SynthPSG (rules in spade/data/synthpsg.py)."""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

__all__ = ["shape_mask", "stuff_layout"]


def _polygon_mask(xx: np.ndarray, yy: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test. xx, yy: [H, W] pixel centres; verts: [V, 2] (x, y)."""
    inside = np.zeros(xx.shape, dtype=bool)
    x0, y0 = verts[:, 0], verts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for a, b, c, d in zip(x0, y0, x1, y1):
        if b == d:
            continue
        crosses = (b > yy) != (d > yy)
        xint = a + (yy - b) * (c - a) / (d - b)
        inside ^= crosses & (xx < xint)
    return inside


def _regular(n: int, r: float, cx: float, cy: float, phase: float) -> np.ndarray:
    ang = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([cx + r * np.cos(ang), cy - r * np.sin(ang)], axis=1)


def shape_mask(cls: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Full (unoccluded) mask [size, size] bool of one shape with centre (cx, cy), radius r."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    if cls == "circle":
        return dx * dx + dy * dy <= r * r
    if cls == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if cls == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if cls == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if cls == "cross":
        w = 0.33 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if cls == "triangle":
        return _polygon_mask(xx, yy, _regular(3, r, cx, cy, np.pi / 2))
    if cls == "hexagon":
        return _polygon_mask(xx, yy, _regular(6, r, cx, cy, 0.0))
    if cls == "star":
        outer = _regular(5, r, cx, cy, np.pi / 2)
        inner = _regular(5, 0.45 * r, cx, cy, np.pi / 2 + np.pi / 5)
        verts = np.empty((10, 2))
        verts[0::2], verts[1::2] = outer, inner
        return _polygon_mask(xx, yy, verts)
    raise ValueError(f"unknown SynthPSG shape class {cls!r}")


def stuff_layout(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, List[str]]:
    """Stuff label map [size, size] (index into the returned class list) and that list."""
    top = "sky" if rng.random() < 0.6 else "wall"
    h0 = rng.uniform(0.3, 0.6) * size
    amp, freq, phase = rng.uniform(0, 0.04 * size), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
    cols = np.arange(size) + 0.5
    horizon = h0 + amp * np.sin(2 * np.pi * freq * cols / size + phase)
    rows = (np.arange(size) + 0.5)[:, None]
    lower = rows >= horizon[None, :]
    if top == "wall":
        classes = ["wall", "floor"]
        return lower.astype(np.int64), classes
    picks = rng.permutation(["ground", "grass", "water"])
    if rng.random() < 0.4:
        split = int(rng.uniform(0.3, 0.7) * size)
        labels = lower.astype(np.int64)
        labels[:, split:] *= 2
        return labels, ["sky", str(picks[0]), str(picks[1])]
    return lower.astype(np.int64), ["sky", str(picks[0])]
