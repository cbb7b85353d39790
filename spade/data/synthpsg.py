"""SynthPSG: a generated panoptic scene-graph dataset in exactly the PSG format.

Every image is a pure function of ``(seed, index)`` (``numpy.random.default_rng([seed, index])``),
so the same seed gives the same bytes and any subset can be regenerated alone.

Scene
-----
* Stuff (``STUFF_CLASSES``): a top band (``sky`` or ``wall``) above a wavy horizon at 30-60 % of
  the height; below it ``floor`` under a wall, else ``ground``, ``grass`` or ``water``; with
  probability 0.4 the lower band is split at a random column into two of those (sky scenes only).
  Each region has its own colour range, a per-image base colour and light pixel noise.
* Things (``THING_CLASSES``): 2 to 8 shapes, radius 8-18 % of the width, a flat palette colour
  (``PALETTE``) with light noise. Shapes are drawn in order; a new shape is rejected (and re-drawn,
  at most 30 tries) when it would leave an earlier thing with fewer than 45 % of its pixels or
  fewer than ``MIN_THING_AREA`` pixels, so no tiny remnant exists. A stuff region left with fewer
  than ``MIN_STUFF_AREA`` pixels becomes void (id 0).
* ``segments_info`` lists things in drawing order (back to front), then stuff; segment id of
  segment k is ``(k + 1) * 97 + category_id`` (COCO RGB encoding, id = R + 256 G + 256^2 B).

Predicate rules (W = image width; c(X) = centroid of the visible mask of X, in pixels)
--------------------------------------------------------------------------------------
Between two things A != B (``A pred B``):
* ``left of``:  c(A).x < c(B).x - W/16;  ``right of``: c(A).x > c(B).x + W/16.
* ``above``:    c(A).y < c(B).y - W/16;  ``below``:    c(A).y > c(B).y + W/16.
* ``next to``:  some pixel of A and some pixel of B are within 3 pixels in both x and y
  (Chebyshev distance <= 3), i.e. A dilated by a 7x7 square meets B.
* ``far from``: |c(A) - c(B)| > W/3 (the paper's "distant" threshold).
* ``in front of``: A is drawn after B, A's visible pixels cover >= 1 pixel of B's full shape
  (A occludes B) and ``A next to B`` holds. Checkable from the PNG: A comes later in
  segments_info and ``next to`` holds (the hidden part itself is not in the PNG).
* ``nearest to``: the image has >= 3 things, B minimises |c(A) - c(X)| over things X != A and its
  distance is < 0.9 times the second smallest.
* ``same colour as``: A and B have the same palette colour (the palette entry nearest to the mean
  image colour of the visible mask; entries are far apart, so this is unambiguous).
Between a thing A and a stuff S:
* ``on``: S is ``ground``, ``grass`` or ``floor`` and at least half of the pixels directly below
  A's lowest visible row (row y_max + 1, at the columns A occupies in row y_max) belong to S.

Annotation sampling
-------------------
All true (subject, predicate, object) candidates are computed; K = min(#candidates, U{3..8})
distinct ones are annotated (never a false one, never an exact duplicate; a pair may carry several
predicates). Each draw first picks a predicate among those with unused candidates with probability
proportional to ``long_tail ** predicate_index`` (1.0 = balanced, smaller = longer tail), then a
uniform candidate of it, so rare-geometry predicates stay frequent.

Files (``<out>/``)
------------------
``psg.json`` (PSG format plus ``val_image_ids``), ``images/NNNNNN.png``, ``panoptic/NNNNNN.png``,
``ov_split.json`` (open-vocabulary split, rule included) and ``manifest.json`` (generation
parameters; written last, its presence marks a complete dataset). Splits by index: i % 10 in
{8, 9} -> test, i % 10 == 7 -> val, else train.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage

from .synthpsg_shapes import shape_mask, stuff_layout

__all__ = [
    "THING_CLASSES",
    "STUFF_CLASSES",
    "PREDICATE_CLASSES",
    "PREDICATE_FLIP_MAP",
    "OV_SPLIT",
    "PALETTE",
    "Scene",
    "render_scene",
    "generate_image",
    "generate_synthpsg",
    "ensure_synthpsg",
    "is_complete",
]

THING_CLASSES = ["circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon"]
STUFF_CLASSES = ["sky", "wall", "ground", "grass", "water", "floor"]
PREDICATE_CLASSES = [
    "left of",
    "right of",
    "above",
    "below",
    "next to",
    "far from",
    "on",
    "in front of",
    "nearest to",
    "same colour as",
]
PREDICATE_FLIP_MAP = [("left of", "right of")]
GROUND_STUFF = ("ground", "grass", "floor")
OV_SPLIT = {
    "rule": (
        "Fixed by name, not by data: the last two shape classes of THING_CLASSES (diamond, "
        "hexagon) and three predicates spanning the three predicate kinds (below: spatial "
        "inverse of a base predicate; far from: distance; same colour as: semantic) are novel. "
        "Stuff and all other classes and predicates are base. Novel classes and predicates are "
        "removed from training only."
    ),
    "base_objects": THING_CLASSES[:6] + STUFF_CLASSES,
    "novel_objects": THING_CLASSES[6:],
    "base_predicates": [
        p for p in PREDICATE_CLASSES if p not in ("below", "far from", "same colour as")
    ],
    "novel_predicates": ["below", "far from", "same colour as"],
}
PALETTE = {
    "red": (220, 30, 30),
    "yellow": (240, 220, 20),
    "blue": (30, 60, 230),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "magenta": (220, 40, 220),
    "orange": (250, 140, 0),
}
# (low RGB, high RGB) of each stuff class's per-image base colour
STUFF_COLOUR_RANGES = {
    "sky": ((120, 180, 220), (170, 215, 255)),
    "wall": ((170, 160, 140), (210, 200, 180)),
    "ground": ((110, 80, 50), (150, 110, 75)),
    "grass": ((50, 120, 40), (90, 160, 70)),
    "water": ((20, 70, 120), (50, 100, 160)),
    "floor": ((140, 100, 60), (180, 130, 90)),
}
MIN_THING_AREA = 30
MIN_STUFF_AREA = 64
MIN_VISIBLE_SHARE = 0.45
NEXT_TO_DISTANCE = 3
NEAREST_RATIO = 0.9
FORMAT_VERSION = 1
_NUM_THINGS = len(THING_CLASSES)


def _split_of(index: int) -> str:
    r = index % 10
    return "test" if r >= 8 else ("val" if r == 7 else "train")


def _place_things(rng: np.random.Generator, size: int, num_things: Tuple[int, int] = (2, 8)):
    """Draw ``num_things`` (inclusive range) shapes with occlusion control.

    Returns (classes, colours, radii, full masks, owner map of the visible pixels)."""
    target = int(rng.integers(num_things[0], num_things[1] + 1))
    classes: List[int] = []
    colours: List[str] = []
    radii: List[float] = []
    full: List[np.ndarray] = []
    owner = np.full((size, size), -1, dtype=np.int64)
    names = list(PALETTE)
    for _ in range(target):
        for _try in range(30):
            cls = int(rng.integers(0, _NUM_THINGS))
            r = rng.uniform(0.08, 0.18) * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            colour = names[int(rng.integers(0, len(names)))]
            mask = shape_mask(THING_CLASSES[cls], cx, cy, r, size)
            if mask.sum() < 2 * MIN_THING_AREA:
                continue
            trial = np.where(mask, len(full), owner)
            counts = np.bincount(trial[trial >= 0].ravel(), minlength=len(full) + 1)
            ok = all(
                counts[k] >= max(MIN_THING_AREA, MIN_VISIBLE_SHARE * full[k].sum())
                for k in range(len(full))
            )
            if ok:
                classes.append(cls)
                colours.append(colour)
                radii.append(float(r))
                full.append(mask)
                owner = trial
                break
    return classes, colours, radii, full, owner


def _centroids(masks: np.ndarray) -> np.ndarray:
    """masks: [N, H, W] bool -> [N, 2] (x, y) centroids in pixel-centre coordinates."""
    yy, xx = np.mgrid[0 : masks.shape[1], 0 : masks.shape[2]] + 0.5
    area = masks.sum(axis=(1, 2)).astype(np.float64)
    return np.stack([(masks * xx).sum(axis=(1, 2)) / area, (masks * yy).sum(axis=(1, 2)) / area], 1)


def true_relations(
    thing_masks: np.ndarray,
    thing_full: Optional[List[np.ndarray]],
    thing_colours: List[str],
    stuff_masks: np.ndarray,
    stuff_names: List[str],
) -> List[Tuple[int, int, int]]:
    """All true triplets (subject, object, predicate) under the module's rules.

    thing_masks: [N, H, W] visible masks in drawing order; stuff_masks: [S, H, W]. Object indices
    of stuff are offset by N (segments_info order). ``thing_full`` (full shapes) decides
    ``in front of``; None skips that predicate.
    """
    n, size = thing_masks.shape[0], thing_masks.shape[2]
    pid = {p: i for i, p in enumerate(PREDICATE_CLASSES)}
    out: List[Tuple[int, int, int]] = []
    if n == 0:
        return out
    cen = _centroids(thing_masks)
    margin, far = size / 16.0, size / 3.0
    dist = np.sqrt(((cen[:, None, :] - cen[None, :, :]) ** 2).sum(-1))
    win = 2 * NEXT_TO_DISTANCE + 1  # square (Chebyshev) dilation, separable into two 1-D maxima
    dilated = ndimage.maximum_filter1d(
        ndimage.maximum_filter1d(thing_masks.astype(np.uint8), win, axis=1, mode="constant"),
        win,
        axis=2,
        mode="constant",
    ).astype(bool)
    for a in range(n):
        others = [b for b in range(n) if b != a]
        nearest = -1
        if len(others) >= 2:
            order = sorted(others, key=lambda b: dist[a, b])
            if dist[a, order[0]] < NEAREST_RATIO * dist[a, order[1]]:
                nearest = order[0]
        for b in others:
            dx, dy = cen[a, 0] - cen[b, 0], cen[a, 1] - cen[b, 1]
            if dx < -margin:
                out.append((a, b, pid["left of"]))
            if dx > margin:
                out.append((a, b, pid["right of"]))
            if dy < -margin:
                out.append((a, b, pid["above"]))
            if dy > margin:
                out.append((a, b, pid["below"]))
            if dist[a, b] > far:
                out.append((a, b, pid["far from"]))
            touching = bool((dilated[a] & thing_masks[b]).any())
            if touching:
                out.append((a, b, pid["next to"]))
            if (
                thing_full is not None
                and a > b
                and touching
                and (thing_masks[a] & thing_full[b]).any()
            ):
                out.append((a, b, pid["in front of"]))
            if b == nearest:
                out.append((a, b, pid["nearest to"]))
            if thing_colours[a] == thing_colours[b]:
                out.append((a, b, pid["same colour as"]))
        ys, xs = np.nonzero(thing_masks[a])
        ymax = ys.max()
        if ymax + 1 < size:
            below_cols = xs[ys == ymax]
            for s, name in enumerate(stuff_names):
                if name in GROUND_STUFF and stuff_masks[s][ymax + 1, below_cols].mean() >= 0.5:
                    out.append((a, n + s, pid["on"]))
    return out


def _sample_relations(rng, cands, long_tail: float) -> List[List[int]]:
    k = min(len(cands), int(rng.integers(3, 9)))
    pools: Dict[int, List[Tuple[int, int, int]]] = {}
    for c in cands:
        pools.setdefault(c[2], []).append(c)
    chosen: List[List[int]] = []
    for _ in range(k):
        preds = sorted(p for p, v in pools.items() if v)
        w = np.array([long_tail**p for p in preds], dtype=np.float64)
        p = preds[int(rng.choice(len(preds), p=w / w.sum()))]
        c = pools[p].pop(int(rng.integers(0, len(pools[p]))))
        chosen.append([int(c[0]), int(c[1]), int(c[2])])
    return chosen


@dataclass
class Scene:
    """Everything one rendered SynthPSG image is made of (the caption corpus describes it).

    Things are in drawing order (back to front); stuff in segments_info order after them.
    """

    rgb: np.ndarray  # uint8 [size, size, 3]
    panoptic: np.ndarray  # uint8 [size, size, 3], COCO RGB id encoding
    record: dict  # the psg.json record (relations sampled from ``candidates``)
    thing_classes: List[int]  # index into THING_CLASSES per thing
    thing_colours: List[str]  # PALETTE name per thing
    thing_radii: List[float]  # shape radius in pixels per thing
    thing_masks: np.ndarray  # bool [N, size, size] visible masks
    stuff_names: List[str]  # STUFF_CLASSES name per kept stuff segment
    stuff_masks: np.ndarray  # bool [S, size, size]
    candidates: List[Tuple[int, int, int]]  # every true (subject, object, predicate)

    @property
    def image_size(self) -> int:
        return int(self.rgb.shape[1])


def render_scene(
    seed: int,
    index: int,
    size: int = 128,
    long_tail: float = 0.85,
    num_things: Tuple[int, int] = (2, 8),
) -> Scene:
    """Render scene ``index`` of generator ``seed`` (a pure function of its arguments).

    ``num_things`` is the inclusive range of shapes drawn; the dataset uses (2, 8), the caption
    corpus (1, 8). Relations are sampled as for the dataset.
    """
    if size < 32:
        raise ValueError(f"SynthPSG size must be >= 32, got {size}")
    if not 1 <= num_things[0] <= num_things[1]:
        raise ValueError(f"num_things must be an increasing range >= 1, got {num_things}")
    rng = np.random.default_rng([int(seed), int(index)])
    stuff_map, stuff_names = stuff_layout(rng, size)
    classes, colours, radii, full, owner = _place_things(rng, size, num_things)
    n = len(classes)
    # image: stuff colours + noise, then flat thing colours + noise
    image = np.zeros((size, size, 3), dtype=np.float64)
    for s, name in enumerate(stuff_names):
        lo, hi = STUFF_COLOUR_RANGES[name]
        image[stuff_map == s] = rng.uniform(lo, hi)
    for k in range(n):
        image[owner == k] = PALETTE[colours[k]]
    image += 6.0 * rng.standard_normal(size=image.shape, dtype=np.float32)
    rgb = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    thing_masks = np.stack([owner == k for k in range(n)]) if n else np.zeros((0, size, size), bool)
    stuff_vis = [(stuff_map == s) & (owner < 0) for s in range(len(stuff_names))]
    keep_stuff = [s for s in range(len(stuff_names)) if stuff_vis[s].sum() >= MIN_STUFF_AREA]
    stuff_masks = (
        np.stack([stuff_vis[s] for s in keep_stuff])
        if keep_stuff
        else np.zeros((0, size, size), bool)
    )
    kept_names = [stuff_names[s] for s in keep_stuff]

    cats = classes + [_NUM_THINGS + STUFF_CLASSES.index(nm) for nm in kept_names]
    masks = np.concatenate([thing_masks, stuff_masks]) if len(cats) else thing_masks
    ids = np.zeros((size, size), dtype=np.int64)
    segments_info, annotations = [], []
    for k, (cat, m) in enumerate(zip(cats, masks)):
        seg_id = (k + 1) * 97 + cat
        ids[m] = seg_id
        ys, xs = np.nonzero(m)
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        isthing = cat < _NUM_THINGS
        segments_info.append(
            {
                "id": seg_id,
                "category_id": cat,
                "iscrowd": 0,
                "isthing": int(isthing),
                "area": int(m.sum()),
            }
        )
        annotations.append({"bbox": box, "bbox_mode": 0, "category_id": cat})
    pan = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)

    cands = true_relations(thing_masks, full, colours, stuff_masks, kept_names)
    relations = _sample_relations(rng, cands, long_tail) if cands else []
    name = f"{index:06d}"
    record = {
        "file_name": f"images/{name}.png",
        "height": size,
        "width": size,
        "image_id": str(index),
        "pan_seg_file_name": f"panoptic/{name}.png",
        "segments_info": segments_info,
        "relations": relations,
        "annotations": annotations,
        "coco_image_id": index,
    }
    return Scene(
        rgb, pan, record, classes, colours, radii, thing_masks, kept_names, stuff_masks, cands
    )


def generate_image(seed: int, index: int, size: int = 128, long_tail: float = 0.85):
    """Render image ``index`` of the dataset with ``seed``.

    Returns (rgb uint8 [size, size, 3], panoptic RGB uint8 [size, size, 3], psg record dict with
    relative file names ``images/NNNNNN.png`` / ``panoptic/NNNNNN.png``).
    """
    scene = render_scene(seed, index, size, long_tail)
    return scene.rgb, scene.panoptic, scene.record


def _write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _manifest(num_images: int, seed: int, size: int, long_tail: float) -> dict:
    return {
        "num_images": int(num_images),
        "seed": int(seed),
        "size": int(size),
        "long_tail": float(long_tail),
        "format_version": FORMAT_VERSION,
    }


def generate_synthpsg(
    out: str, num_images: int, seed: int = 0, size: int = 128, long_tail: float = 0.85
) -> dict:
    """Write a complete SynthPSG dataset into folder ``out`` (created; files overwritten).

    Returns the manifest dict plus ``seconds`` / ``cpu_seconds`` (wall / CPU time of the run).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 0.0 < long_tail <= 1.0:
        raise ValueError(f"long_tail must be in (0, 1], got {long_tail}")
    start, cpu_start = time.perf_counter(), time.process_time()
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "panoptic"), exist_ok=True)
    data, test_ids, val_ids = [], [], []
    for i in range(num_images):
        rgb, pan, rec = generate_image(seed, i, size, long_tail)
        Image.fromarray(rgb).save(os.path.join(out, rec["file_name"]), compress_level=1)
        Image.fromarray(pan).save(os.path.join(out, rec["pan_seg_file_name"]), compress_level=1)
        data.append(rec)
        split = _split_of(i)
        if split == "test":
            test_ids.append(rec["image_id"])
        elif split == "val":
            val_ids.append(rec["image_id"])
    psg = {
        "data": data,
        "thing_classes": THING_CLASSES,
        "stuff_classes": STUFF_CLASSES,
        "predicate_classes": PREDICATE_CLASSES,
        "test_image_ids": test_ids,
        "val_image_ids": val_ids,
    }
    _write_json(psg, os.path.join(out, "psg.json"))
    _write_json(OV_SPLIT, os.path.join(out, "ov_split.json"))
    manifest = _manifest(num_images, seed, size, long_tail)
    _write_json(manifest, os.path.join(out, "manifest.json"))
    return dict(
        manifest,
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
    )


def is_complete(root: str) -> Optional[dict]:
    """The manifest of a complete SynthPSG folder, or None when ``root`` holds none."""
    path = os.path.join(root, "manifest.json")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(root, "psg.json"))):
        return None
    with open(path) as f:
        return json.load(f)


def ensure_synthpsg(
    root: str, num_images: int = 600, seed: int = 0, size: int = 128, long_tail: float = 0.85
) -> str:
    """Generate SynthPSG into ``root`` unless it already holds a complete one; returns ``root``.

    Generation goes to a temporary sibling folder renamed into place, so readers never see a
    partial dataset and concurrent callers are safe. A complete dataset made with other parameters
    is an error (it is never deleted silently).
    """
    wanted = _manifest(num_images, seed, size, long_tail)
    found = is_complete(root)
    if found is None:
        if os.path.isdir(root) and os.listdir(root):
            raise FileExistsError(
                f"{root} exists but holds no complete SynthPSG (no manifest.json); remove it or "
                "choose another root"
            )
        parent = os.path.dirname(os.path.abspath(root))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".synthpsg-", dir=parent)
        try:
            generate_synthpsg(tmp, num_images, seed, size, long_tail)
            if os.path.isdir(root) and not os.listdir(root):
                os.rmdir(root)
            try:
                os.rename(tmp, root)
            except OSError:
                if is_complete(root) is None:  # another process did not win the race
                    raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
        found = is_complete(root)
    if found != wanted:
        raise ValueError(
            f"{root} holds SynthPSG generated with {found}, but {wanted} was asked for; remove "
            "the folder or point DATASETS.SYNTHPSG.ROOT / SPADE_SYNTHPSG_ROOT elsewhere"
        )
    return root
