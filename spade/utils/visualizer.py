"""Drawing SPADE predictions: a panoptic overlay with the top triplets, and a scene graph.

:class:`SceneGraphVisualizer` holds the vocabulary (class and predicate names, class colours) and
turns one image plus its model output into three files (:meth:`SceneGraphVisualizer.save`):

- ``<stem>_panoptic.png``: the image (upscaled by an integer factor so its short side is at least
  ``min_display_side``) with every segment blended in its colour, outlined and labelled, and a
  panel on the right listing the top triplets "rank. subject predicate object score";
- ``<stem>_graph.png``: the scene graph drawn over a faded copy of the image: one node per segment
  at its mask centroid (pushed apart when centroids crowd), coloured like its mask; one labelled,
  directed edge per triplet (subject -> object); several edges of one pair curve apart;
- ``<stem>_triplets.json``: :func:`spade.utils.scene_graph_view.scene_graph_to_dict`.

Everything is drawn with matplotlib's Agg canvas (no display, no graphviz) and is deterministic.
Images without segments or without relations are drawn with a note saying so.
"""

import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
from matplotlib.patches import Rectangle

from .canvas import FONT, check_image, display_scale, hex_color, render, text_color, write_png
from .io import atomic_write_json
from .scene_graph_drawing import draw_scene_graph
from .scene_graph_view import (
    Color,
    SceneGraphView,
    default_class_colors,
    prepare_scene_graph,
    scene_graph_to_dict,
)

__all__ = [
    "SceneGraphVisualizer",
    "draw_panoptic_overlay",
    "draw_scene_graph",
    "write_png",
    "write_triplets_json",
]

_LINE = 18  # line height of the triplet panel in pixels
_MARGIN = 8


def draw_panoptic_overlay(
    image: np.ndarray,
    view: SceneGraphView,
    *,
    alpha: float = 0.5,
    min_display_side: int = 384,
    max_display_side: int = 1600,
    panel_width: int = 360,
) -> np.ndarray:
    """The panoptic overlay and the triplet panel as one uint8 RGB image.

    Args:
        image: uint8 [H, W, 3] RGB.
        view: the prepared prediction of this image.
        alpha: weight of the segment colour; a segment pixel becomes
            round((1 - alpha) * image + alpha * colour), before outlines and labels.
    Returns:
        uint8 [s*H, s*W + panel_width, 3] with s = display_scale(H, W, ...).
    """
    image = check_image(image, view)
    s = display_scale(view.height, view.width, min_display_side, max_display_side)
    colors = np.zeros((len(view.segments) + 1, 3), dtype=np.float64)
    index = np.zeros(view.seg.shape, dtype=np.int64)
    for i, seg in enumerate(view.segments):
        index[view.seg == seg.id] = i + 1
        colors[i + 1] = seg.color
    blended = image.astype(np.float64)
    inside = index > 0
    blended[inside] = (1 - alpha) * blended[inside] + alpha * colors[index[inside]]
    blended = np.repeat(np.repeat(np.round(blended).astype(np.uint8), s, 0), s, 1)
    big_index = np.repeat(np.repeat(index, s, 0), s, 1)
    edge = np.zeros(big_index.shape, dtype=bool)  # pixels with a differing 4-neighbour
    vertical, horizontal = big_index[:-1] != big_index[1:], big_index[:, :-1] != big_index[:, 1:]
    edge[:-1] |= vertical
    edge[1:] |= vertical
    edge[:, :-1] |= horizontal
    edge[:, 1:] |= horizontal
    edge &= big_index > 0
    blended[edge] = (colors[big_index[edge]] * 0.55).astype(np.uint8)
    hd, wd = blended.shape[:2]
    canvas = np.full((hd, wd + panel_width, 3), 255, dtype=np.uint8)
    canvas[:, :wd] = blended

    def draw(ax: Any) -> None:
        image_region = Rectangle((0, 0), wd, hd, transform=ax.transData)  # labels stay inside
        for seg in view.segments:
            if seg.area == 0:
                continue
            x, y = (seg.label_point[0] + 0.5) * s, (seg.label_point[1] + 0.5) * s
            label = ax.text(
                x,
                y,
                seg.label,
                fontsize=FONT - 2,
                ha="left" if x < 0.2 * wd else "right" if x > 0.8 * wd else "center",
                va="center",
                color=text_color(seg.color),
                clip_on=True,
                bbox=dict(boxstyle="round,pad=0.15", fc=hex_color(seg.color), ec="none", alpha=0.8),
            )
            label.set_clip_path(image_region)
        _draw_triplet_panel(ax, view, x0=wd + _MARGIN, height=hd)

    return render(canvas, draw)


def _draw_triplet_panel(ax: Any, view: SceneGraphView, x0: float, height: int) -> None:
    """List the view's triplets, one per line, the segment names boxed in their colours."""
    y = _MARGIN + _LINE / 2
    shown = len(view.triplets)
    title = f"top {shown} of {view.num_triplets} triplets" if view.has_relations else ""
    if not view.segments:
        title = "no segments predicted"
    elif not view.has_relations:
        title = "no relations (model without relation head)"
    elif shown == 0:
        title = f"no relations above the threshold ({view.num_triplets} predicted)"
    ax.text(x0, y, title, fontsize=FONT, fontweight="bold", va="center", ha="left")
    capacity = max(0, int((height - 2 * _MARGIN) // _LINE) - 1)
    for t in view.triplets[: capacity - 1 if shown > capacity else shown]:
        y += _LINE
        subj, obj = view.segment(t.subject_id), view.segment(t.object_id)
        pieces = [
            (f"{t.rank}. ", None),
            (subj.label, subj.color),
            (f" {t.predicate} ", None),
            (obj.label, obj.color),
            (f"  {t.score:.2f}", None),
        ]
        prev = None
        for text, color in pieces:
            kw = dict(fontsize=FONT - 1, va="center", ha="left", clip_on=True)
            if color is not None:
                kw.update(
                    color=text_color(color),
                    bbox=dict(boxstyle="round,pad=0.12", fc=hex_color(color), ec="none"),
                )
            if prev is None:
                prev = ax.text(x0, y, text, **kw)
            else:
                prev = ax.annotate(text, xy=(1.0, 0.5), xycoords=prev, annotation_clip=False, **kw)
    if shown > capacity:
        ax.text(
            x0,
            y + _LINE,
            f"... {shown - max(0, capacity - 1)} more in the JSON",
            fontsize=FONT - 1,
            va="center",
            ha="left",
            style="italic",
        )


def write_triplets_json(path: str, view: SceneGraphView) -> None:
    """Write the view's segments and ranked triplets (by id and by name) as JSON, atomically."""
    atomic_write_json(path, scene_graph_to_dict(view), indent=1)


class SceneGraphVisualizer:
    """Draws and writes one image's prediction in a fixed vocabulary (see the module doc)."""

    def __init__(
        self,
        class_names: Sequence[str],
        predicate_names: Sequence[str],
        class_colors: Optional[Sequence[Color]] = None,
        *,
        alpha: float = 0.5,
        min_display_side: int = 384,
    ):
        if not class_names or not predicate_names:
            raise ValueError("SceneGraphVisualizer needs non-empty class and predicate names")
        self.class_names = list(class_names)
        self.predicate_names = list(predicate_names)
        if class_colors is None or len(class_colors) != len(class_names):
            class_colors = default_class_colors(len(class_names))
        self.class_colors = [tuple(int(v) for v in c) for c in class_colors]
        self.alpha = alpha
        self.min_display_side = min_display_side

    @classmethod
    def from_metadata(cls, metadata: Any, **kwargs: Any) -> "SceneGraphVisualizer":
        """Vocabulary and colours of a PSG-style dataset's metadata (things first, then stuff)."""
        things = list(getattr(metadata, "thing_classes", []))
        stuff = list(getattr(metadata, "stuff_classes", []))
        predicates = list(getattr(metadata, "predicate_classes", []))
        if not things + stuff or not predicates:
            raise ValueError(
                f"metadata {getattr(metadata, 'name', '?')!r} lacks thing_classes/stuff_classes "
                "or predicate_classes"
            )
        colors = list(getattr(metadata, "thing_colors", [])) + list(
            getattr(metadata, "stuff_colors", [])
        )
        return cls(things + stuff, predicates, colors or None, **kwargs)

    def prepare(
        self,
        image: np.ndarray,
        predictions: Dict[str, Any],
        *,
        top_k: int = 20,
        score_threshold: float = 0.0,
        image_name: str = "<image>",
    ) -> SceneGraphView:
        """Validate ``predictions`` against ``image`` (uint8 [H, W, 3] RGB) and this vocabulary."""
        return prepare_scene_graph(
            predictions,
            self.class_names,
            self.predicate_names,
            class_colors=self.class_colors,
            top_k=top_k,
            score_threshold=score_threshold,
            image_shape=np.asarray(image).shape[:2],
            image_name=image_name,
        )

    def save(
        self,
        image: np.ndarray,
        predictions: Dict[str, Any],
        output_dir: str,
        stem: str,
        *,
        top_k: int = 20,
        score_threshold: float = 0.0,
        image_name: Optional[str] = None,
    ) -> Dict[str, str]:
        """Write ``<stem>_panoptic.png``, ``<stem>_graph.png`` and ``<stem>_triplets.json`` into
        ``output_dir``; returns {"panoptic", "graph", "json"} -> path."""
        view = self.prepare(
            image,
            predictions,
            top_k=top_k,
            score_threshold=score_threshold,
            image_name=image_name or stem,
        )
        paths = {
            "panoptic": os.path.join(output_dir, f"{stem}_panoptic.png"),
            "graph": os.path.join(output_dir, f"{stem}_graph.png"),
            "json": os.path.join(output_dir, f"{stem}_triplets.json"),
        }
        write_png(
            paths["panoptic"],
            draw_panoptic_overlay(
                image, view, alpha=self.alpha, min_display_side=self.min_display_side
            ),
        )
        write_png(
            paths["graph"], draw_scene_graph(image, view, min_display_side=self.min_display_side)
        )
        write_triplets_json(paths["json"], view)
        return paths
