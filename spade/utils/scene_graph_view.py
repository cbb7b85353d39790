"""One image's prediction, validated and put in display terms (names, colours, centroids).

The model output of one image (docs/INTERFACES.md, "Model output")::

    {"panoptic_seg": (seg int [H, W] (0 = void), segments_info [{"id", "category_id", "isthing",
                                                                 "score"}]),
     "relations": {"triplets": long [T, 3] (subject segment id, object segment id, predicate),
                   "scores": float [T], "predicate_scores": float [T, P]}}

is turned by :func:`prepare_scene_graph` into a :class:`SceneGraphView`: the segments with their
class names, display labels ("circle", or "circle#2" when a class occurs more than once), colours,
areas, boxes and centroids, and the top triplets after the score threshold. Drawing
(:mod:`spade.utils.visualizer`) and the JSON writer read only this view, so every output of one
image names and colours a segment the same way. Shape shorthand: H x W image, T triplets,
P predicates, K classes.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.utils.colormap import colormap
from scipy import ndimage

__all__ = [
    "SegmentView",
    "TripletView",
    "SceneGraphView",
    "prepare_scene_graph",
    "default_class_colors",
    "scene_graph_to_dict",
]

Color = Tuple[int, int, int]


@dataclass
class SegmentView:
    """A predicted segment. ``bbox`` is [x0, y0, x1, y1] (inclusive-exclusive pixels),
    ``centroid`` is (x, y) in pixels, ``label_point`` (x, y) is the pixel deepest inside the mask.
    """

    id: int
    category_id: int
    category: str
    label: str
    isthing: bool
    score: Optional[float]
    area: int
    bbox: List[int]
    centroid: Tuple[float, float]
    label_point: Tuple[int, int]
    color: Color


@dataclass
class TripletView:
    """A ranked triplet; ``top_predicates`` lists (name, score) of its pair's best predicates."""

    rank: int
    subject_id: int
    object_id: int
    predicate_id: int
    predicate: str
    score: float
    top_predicates: List[Tuple[str, float]] = field(default_factory=list)


@dataclass
class SceneGraphView:
    """A validated prediction of one image. ``seg`` is the int64 [H, W] panoptic id map;
    ``num_triplets`` counts the triplets before the threshold and top-k cut."""

    image_name: str
    seg: np.ndarray
    segments: List[SegmentView]
    triplets: List[TripletView]
    num_triplets: int
    has_relations: bool

    @property
    def height(self) -> int:
        return int(self.seg.shape[0])

    @property
    def width(self) -> int:
        return int(self.seg.shape[1])

    def segment(self, segment_id: int) -> SegmentView:
        """The segment with panoptic id ``segment_id``."""
        for s in self.segments:
            if s.id == segment_id:
                return s
        raise KeyError(f"{self.image_name}: no segment with id {segment_id}")


def default_class_colors(num_classes: int) -> List[Color]:
    """A fixed RGB colour per class index (detectron2's colormap, cycled)."""
    palette = colormap(rgb=True, maximum=255).round().astype(int)
    return [tuple(int(c) for c in palette[i % len(palette)]) for i in range(num_classes)]


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _instance_color(base: Color, repeat: int) -> Color:
    """The class colour for the first segment of a class; fixed shifts for later ones."""
    if repeat == 0:
        return base
    shift = np.random.default_rng(repeat).uniform(-60.0, 60.0, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(base, dtype=float) + shift, 0, 255).round())


def _segment_geometry(seg: np.ndarray, ids: Sequence[int]) -> List[Dict[str, Any]]:
    """Area, box, centroid and deepest interior point of each id in ``ids`` within ``seg``."""
    h, w = seg.shape
    index = np.zeros(seg.shape, dtype=np.int64)
    for i, sid in enumerate(ids):
        index[seg == sid] = i + 1
    slices = ndimage.find_objects(index, max_label=len(ids))
    out = []
    for i, sl in enumerate(slices):
        if sl is None:
            out.append(
                {
                    "area": 0,
                    "bbox": [0, 0, 0, 0],
                    "centroid": (w / 2.0, h / 2.0),
                    "label_point": (w // 2, h // 2),
                }
            )
            continue
        crop = index[sl] == i + 1
        ys, xs = np.nonzero(crop)
        y0, x0 = sl[0].start, sl[1].start
        depth = ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
        py, px = np.unravel_index(int(np.argmax(depth)), depth.shape)
        out.append(
            {
                "area": int(crop.sum()),
                "bbox": [int(x0), int(y0), int(sl[1].stop), int(sl[0].stop)],
                "centroid": (float(xs.mean() + x0), float(ys.mean() + y0)),
                "label_point": (int(px + x0), int(py + y0)),
            }
        )
    return out


def _prepare_segments(
    seg: np.ndarray,
    segments_info: Sequence[Dict[str, Any]],
    class_names: Sequence[str],
    class_colors: Sequence[Color],
    image_name: str,
) -> List[SegmentView]:
    ids, categories = [], []
    for j, info in enumerate(segments_info):
        for key in ("id", "category_id"):
            if key not in info:
                raise ValueError(f"{image_name}: panoptic_seg segments_info[{j}] has no {key!r}")
        sid, cat = int(info["id"]), int(info["category_id"])
        if sid < 1 or sid in ids:
            raise ValueError(
                f"{image_name}: panoptic_seg segments_info[{j}]['id'] = {sid} is not a unique "
                "id >= 1"
            )
        if not 0 <= cat < len(class_names):
            raise ValueError(
                f"{image_name}: panoptic_seg segments_info[{j}]['category_id'] = {cat} is outside "
                f"the vocabulary of {len(class_names)} classes"
            )
        ids.append(sid)
        categories.append(cat)
    unknown = sorted(set(np.unique(seg).tolist()) - set(ids) - {0})
    if unknown:
        raise ValueError(
            f"{image_name}: panoptic_seg map holds ids {unknown[:10]} missing from segments_info"
        )
    geometry = _segment_geometry(seg, ids)
    totals = {c: categories.count(c) for c in set(categories)}
    seen: Dict[int, int] = {}
    segments = []
    for info, sid, cat, geo in zip(segments_info, ids, categories, geometry):
        repeat = seen.get(cat, 0)
        seen[cat] = repeat + 1
        name = str(class_names[cat])
        label = name if totals[cat] == 1 else f"{name}#{repeat + 1}"
        score = info.get("score")
        segments.append(
            SegmentView(
                id=sid,
                category_id=cat,
                category=name,
                label=label,
                isthing=bool(info.get("isthing", True)),
                score=None if score is None else float(score),
                color=_instance_color(tuple(class_colors[cat]), repeat),
                **geo,
            )
        )
    return segments


def _prepare_triplets(
    relations: Dict[str, Any],
    segment_ids: Sequence[int],
    predicate_names: Sequence[str],
    top_k: int,
    score_threshold: float,
    image_name: str,
) -> Tuple[List[TripletView], int]:
    for key in ("triplets", "scores"):
        if key not in relations:
            raise ValueError(f"{image_name}: relations has no {key!r}")
    triplets = _to_numpy(relations["triplets"]).astype(np.int64).reshape(-1, 3)
    scores = _to_numpy(relations["scores"]).astype(np.float64).reshape(-1)
    if len(scores) != len(triplets):
        raise ValueError(
            f"{image_name}: relations['scores'] has {len(scores)} rows but relations['triplets'] "
            f"has {len(triplets)}"
        )
    pred_scores = relations.get("predicate_scores")
    if pred_scores is not None:
        pred_scores = _to_numpy(pred_scores).astype(np.float64)
        if pred_scores.ndim != 2 or pred_scores.shape[0] != len(triplets):
            raise ValueError(
                f"{image_name}: relations['predicate_scores'] has shape {pred_scores.shape}, "
                f"expected [{len(triplets)}, P]"
            )
    known = set(segment_ids)
    for row, (s, o, p) in enumerate(triplets.tolist()):
        if s not in known or o not in known:
            raise ValueError(
                f"{image_name}: relations['triplets'][{row}] = {[s, o, p]} names a segment id "
                f"that is not in segments_info {sorted(known)}"
            )
        if not 0 <= p < len(predicate_names):
            raise ValueError(
                f"{image_name}: relations['triplets'][{row}] predicate {p} is outside the "
                f"vocabulary of {len(predicate_names)} predicates"
            )
    order = np.argsort(-scores, kind="stable")
    views = []
    for row in order:
        if scores[row] < score_threshold or len(views) >= top_k:
            break
        s, o, p = (int(v) for v in triplets[row])
        top: List[Tuple[str, float]] = []
        if pred_scores is not None:
            row_scores = pred_scores[row][: len(predicate_names)]
            best = np.argsort(-row_scores, kind="stable")[:3]
            top = [(str(predicate_names[i]), float(row_scores[i])) for i in best]
        views.append(
            TripletView(len(views) + 1, s, o, p, str(predicate_names[p]), float(scores[row]), top)
        )
    return views, len(triplets)


def prepare_scene_graph(
    predictions: Dict[str, Any],
    class_names: Sequence[str],
    predicate_names: Sequence[str],
    *,
    class_colors: Optional[Sequence[Color]] = None,
    top_k: int = 20,
    score_threshold: float = 0.0,
    image_shape: Optional[Tuple[int, int]] = None,
    image_name: str = "<image>",
) -> SceneGraphView:
    """Validate one image's model output and resolve names, colours and geometry.

    Args:
        predictions: the model output of one image (module doc); "relations" may be absent.
        class_names: K names indexed by ``category_id`` (things then stuff).
        predicate_names: P names indexed by the predicate column of the triplets.
        class_colors: K RGB colours; default :func:`default_class_colors`.
        top_k: keep at most this many triplets (the highest scored).
        score_threshold: drop triplets scored below this.
        image_shape: (H, W) the panoptic map must have, when given.
        image_name: named in every error message (the input file).

    Raises:
        ValueError: a missing key, a shape mismatch, an id or index outside its range.
    """
    if top_k < 0:
        raise ValueError(f"{image_name}: top_k must be >= 0, got {top_k}")
    if class_colors is None:
        class_colors = default_class_colors(len(class_names))
    if len(class_colors) < len(class_names):
        raise ValueError(f"{len(class_colors)} class colours for {len(class_names)} classes")
    if "panoptic_seg" not in predictions:
        raise ValueError(
            f"{image_name}: predictions have no 'panoptic_seg' (keys: {list(predictions)})"
        )
    seg, segments_info = predictions["panoptic_seg"]
    seg = _to_numpy(seg)
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(
            f"{image_name}: panoptic_seg map must be an integer [H, W] array, got {seg.dtype} "
            f"{tuple(seg.shape)}"
        )
    if image_shape is not None and tuple(seg.shape) != tuple(image_shape):
        raise ValueError(
            f"{image_name}: panoptic_seg map is {tuple(seg.shape)} but the image is "
            f"{tuple(image_shape)}"
        )
    seg = seg.astype(np.int64)
    segments = _prepare_segments(seg, segments_info, class_names, class_colors, image_name)
    relations = predictions.get("relations")
    triplets: List[TripletView] = []
    num = 0
    if relations is not None:
        triplets, num = _prepare_triplets(
            relations, [s.id for s in segments], predicate_names, top_k, score_threshold, image_name
        )
    return SceneGraphView(image_name, seg, segments, triplets, num, relations is not None)


def scene_graph_to_dict(view: SceneGraphView) -> Dict[str, Any]:
    """The JSON-ready content of a view: image size, segments and ranked triplets by name."""
    labels = {s.id: s.label for s in view.segments}
    return {
        "file_name": view.image_name,
        "height": view.height,
        "width": view.width,
        "segments": [
            {
                "id": s.id,
                "label": s.label,
                "category_id": s.category_id,
                "category": s.category,
                "isthing": s.isthing,
                "score": s.score,
                "area": s.area,
                "bbox": s.bbox,
                "centroid": [round(s.centroid[0], 2), round(s.centroid[1], 2)],
                "color": list(s.color),
            }
            for s in view.segments
        ],
        "num_predicted_triplets": view.num_triplets,
        "triplets": [
            {
                "rank": t.rank,
                "subject_id": t.subject_id,
                "object_id": t.object_id,
                "subject": labels[t.subject_id],
                "predicate_id": t.predicate_id,
                "predicate": t.predicate,
                "object": labels[t.object_id],
                "score": t.score,
                "top_predicates": [[n, v] for n, v in t.top_predicates],
            }
            for t in view.triplets
        ],
    }
