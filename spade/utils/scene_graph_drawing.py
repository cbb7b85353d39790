"""Drawing a scene graph over its image: nodes at mask centroids, labelled directed edges.

Nodes are the segments, coloured like their masks and placed at their mask centroids (pushed
apart by a fixed number of deterministic relaxation steps when centroids crowd). Each triplet is
an arrow subject -> object labelled with its predicate; triplets of one subject -> object pair
(several predicate rows) share one arrow labelled with their predicates in rank order, and the two
directions of a pair curve apart. Rendering is matplotlib Agg only (no graphviz) and deterministic.
"""

from collections import defaultdict
from typing import Any, Dict, List, Tuple

import numpy as np

from .canvas import FONT, check_image, display_scale, hex_color, render, text_color
from .scene_graph_view import SceneGraphView

__all__ = ["draw_scene_graph", "node_positions", "edge_labels"]


def edge_labels(view: SceneGraphView) -> List[Tuple[int, int, str]]:
    """One (subject id, object id, label) per ordered pair of the drawn triplets, in the order of
    each pair's best triplet; the label joins the pair's predicates in rank order with ", "."""
    labels: Dict[Tuple[int, int], List[str]] = {}
    for t in view.triplets:
        names = labels.setdefault((t.subject_id, t.object_id), [])
        if t.predicate not in names:
            names.append(t.predicate)
    return [(s, o, ", ".join(names)) for (s, o), names in labels.items()]


def node_positions(view: SceneGraphView, scale: float, min_dist: float) -> Dict[int, np.ndarray]:
    """Node centres (display pixels, [2] = x, y) at the mask centroids, pushed apart until no two
    are closer than ``min_dist``: at most 100 deterministic relaxation steps, each moving both
    nodes of every too-close pair half the missing distance apart, then clamping into the image."""
    ids = [s.id for s in view.segments]
    pos = np.array([[s.centroid[0] + 0.5, s.centroid[1] + 0.5] for s in view.segments]) * scale
    pos = pos.reshape(-1, 2)
    n = len(pos)
    lo = np.full(2, min_dist / 2)
    hi = np.maximum(lo, np.array([view.width, view.height]) * scale - min_dist / 2)
    # coincident centres separate along a fixed direction that depends on the pair
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    fallback = np.stack([np.cos(i + 2.0 * j), np.sin(i + 2.0 * j)], -1)  # [n, n, 2]
    fallback = np.where((i < j)[..., None], fallback, -fallback.transpose(1, 0, 2))
    for _ in range(100):
        diff = pos[None, :, :] - pos[:, None, :]  # [n, n, 2]: diff[a, b] = pos[b] - pos[a]
        dist = np.hypot(diff[..., 0], diff[..., 1])
        close = (dist < min_dist) & (i != j)
        if not close.any():
            break
        unit = np.where(
            (dist > 1e-6)[..., None], diff / np.maximum(dist, 1e-6)[..., None], fallback
        )
        push = np.where(close, (min_dist - dist) / 2, 0.0)[..., None] * unit  # on b, away from a
        pos = np.clip(pos + push.sum(0), lo, hi)
    return {sid: p for sid, p in zip(ids, pos)}


def draw_scene_graph(
    image: np.ndarray,
    view: SceneGraphView,
    *,
    min_display_side: int = 384,
    max_display_side: int = 1600,
    background_alpha: float = 0.25,
) -> np.ndarray:
    """The scene graph of ``view`` over a faded copy of ``image``, as uint8 [s*H, s*W, 3].

    Nodes of segments that take part in a shown triplet are opaque, the others faint.
    """
    image = check_image(image, view)
    s = display_scale(view.height, view.width, min_display_side, max_display_side)
    faded = np.round(255 - background_alpha * (255 - image.astype(np.float64))).astype(np.uint8)
    canvas = np.repeat(np.repeat(faded, s, 0), s, 1)
    pos = node_positions(view, s, min_dist=44.0)
    used = {t.subject_id for t in view.triplets} | {t.object_id for t in view.triplets}

    def draw(ax: Any) -> None:
        boxes = {}
        for seg in view.segments:
            active = seg.id in used
            boxes[seg.id] = ax.text(
                *pos[seg.id],
                seg.label,
                fontsize=FONT,
                ha="center",
                va="center",
                zorder=3,
                color=text_color(seg.color),
                alpha=1.0 if active else 0.45,
                bbox=dict(
                    boxstyle="round,pad=0.3",
                    fc=hex_color(seg.color),
                    ec="black",
                    lw=1.0 if active else 0.3,
                    alpha=1.0 if active else 0.35,
                ),
            )
        _draw_edges(ax, view, pos, boxes)
        note = None
        if not view.segments:
            note = "no segments predicted"
        elif not view.has_relations:
            note = "no relations (model without relation head)"
        elif not view.triplets:
            note = "no relations above the threshold"
        if note is not None:
            ax.text(
                canvas.shape[1] / 2,
                canvas.shape[0] / 2,
                note,
                fontsize=FONT + 3,
                zorder=5,
                ha="center",
                va="center",
                bbox=dict(fc="white", ec="gray"),
            )

    return render(canvas, draw)


def _draw_edges(ax: Any, view: SceneGraphView, pos: Dict[int, np.ndarray], boxes: Dict) -> None:
    """One arrow per ordered pair (:func:`edge_labels`); the two directions of a pair curve
    apart."""
    groups: Dict[Tuple[int, int], List] = defaultdict(list)
    for subject, obj, label in edge_labels(view):
        groups[(min(subject, obj), max(subject, obj))].append((subject, obj, label))
    for (a, b), edges in groups.items():
        for j, (subject, obj, label) in enumerate(edges):
            if a == b:  # a relation of a segment with itself: a note beside its node
                x, y = pos[a]
                ax.text(
                    x,
                    y + 16 + 12 * j,
                    f"\u21bb {label}",
                    fontsize=FONT - 2,
                    ha="center",
                    va="center",
                    zorder=4,
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8),
                )
                continue
            rad = 0.0 if len(edges) == 1 else 0.35 * (j - (len(edges) - 1) / 2)
            if subject != a:
                rad = -rad  # arc3 curves relative to the arrow's own direction
            p0, p1 = pos[subject], pos[obj]
            ax.annotate(
                "",
                xy=tuple(p1),
                xytext=tuple(p0),
                zorder=2,
                arrowprops=dict(
                    arrowstyle="-|>",
                    color="#333333",
                    lw=1.4,
                    mutation_scale=14,
                    connectionstyle=f"arc3,rad={rad}",
                    patchA=boxes[subject].get_bbox_patch(),
                    patchB=boxes[obj].get_bbox_patch(),
                ),
            )
            d0, d1 = ax.transData.transform(p0), ax.transData.transform(p1)
            dx, dy = d1 - d0
            mid_display = (d0 + d1) / 2 + 0.5 * rad * np.array([dy, -dx])
            mx, my = ax.transData.inverted().transform(mid_display)
            ax.text(
                mx,
                my,
                label,
                fontsize=FONT - 2,
                ha="center",
                va="center",
                zorder=4,
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="#333333", lw=0.5, alpha=0.9),
            )
