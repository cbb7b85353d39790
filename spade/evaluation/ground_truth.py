"""Ground truth for relation evaluation: from registered dataset dicts or from a psg.json file."""

import json
import os
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from .errors import EvaluationInputError
from .image_pass import decode_panoptic_png
from .sgg_metrics import GroundTruthGraph

_IMAGE_FIELDS = ("image_id", "height", "width", "pan_seg_file_name", "segments_info", "relations")


def read_panoptic_png(path: str, image_id: str = "?") -> np.ndarray:
    """Segment-id map [H, W] uint32 of a COCO-panoptic RGB PNG (id = R + 256 G + 256^2 B).

    EvaluationInputError naming the file and the image when it is missing or not an image.
    """
    if not os.path.isfile(path):
        raise EvaluationInputError(f"image {image_id}: panoptic PNG not found: {path}")
    try:
        return decode_panoptic_png(path)
    except (OSError, ValueError, SyntaxError) as e:
        raise EvaluationInputError(f"image {image_id}: cannot decode panoptic PNG {path} ({e})")


def read_json(path: str, what: str):
    """json.load of ``path``; EvaluationInputError naming the file when unreadable or invalid."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise EvaluationInputError(f"{path}: cannot read {what} ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluationInputError(f"{path}: {what} is not valid JSON ({e})") from e


def is_int(x) -> bool:
    """A JSON integer (Python or numpy int; not a bool, not a float such as 1.0)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def unique_triplets(relations) -> np.ndarray:
    """[R, 3] int64 with exact duplicate rows removed, first occurrences kept in order."""
    rel = np.asarray(relations, dtype=np.int64).reshape(-1, 3)
    if len(rel) == 0:
        return rel
    _, first = np.unique(rel, axis=0, return_index=True)
    return rel[np.sort(first)]


def ground_truth_from_dict(record: Dict, box_only: bool = False) -> GroundTruthGraph:
    """Build the evaluation ground truth of one dataset dict (docs/INTERFACES.md format).

    Labels from segments_info category_id; relations de-duplicated (a pair may keep several
    predicates); masks from the panoptic PNG (decoded here, once), or boxes from segments_info
    "bbox" when box_only; iscrowd and "area" (when every segment has one) for PQ.
    """
    image_id = str(record.get("image_id"))
    segs = record.get("segments_info", [])
    rel = unique_triplets(record.get("relations", []))
    if len(rel) and (rel[:, :2].min() < 0 or rel[:, :2].max() >= len(segs)):
        raise EvaluationInputError(
            f"image {image_id}: ground-truth 'relations' index a segment outside "
            f"segments_info (0..{len(segs) - 1})"
        )
    gt = GroundTruthGraph(
        image_id=image_id,
        height=int(record["height"]),
        width=int(record["width"]),
        labels=np.asarray([s["category_id"] for s in segs], dtype=np.int64),
        relations=rel,
        segment_ids=np.asarray([s["id"] for s in segs], dtype=np.int64),
        iscrowd=np.asarray([int(s.get("iscrowd", 0)) == 1 for s in segs], dtype=bool),
    )
    if segs and all("area" in s for s in segs):
        gt.areas = np.asarray([s["area"] for s in segs], dtype=np.int64)
    if box_only:
        try:
            gt.boxes = np.asarray([s["bbox"] for s in segs], dtype=np.float64).reshape(-1, 4)
        except KeyError as e:
            raise EvaluationInputError(
                f"image {image_id}: segments_info lacks 'bbox' (box_only)"
            ) from e
    else:
        png = record["pan_seg_file_name"]
        gt.seg = read_panoptic_png(png, image_id)
        if gt.seg.shape != (gt.height, gt.width):
            raise EvaluationInputError(
                f"image {image_id}: panoptic PNG {png} is {gt.seg.shape[0]}x{gt.seg.shape[1]}, "
                f"height/width say {gt.height}x{gt.width}"
            )
    return gt


def _check_image(d, i: int, json_file: str, num_classes: int, num_predicates: int) -> str:
    """Validate data[i] of a psg.json; returns its image id as a string."""
    if not isinstance(d, Mapping):
        raise EvaluationInputError(f"{json_file}: data[{i}] is not an object")
    where = f"{json_file}: image {d.get('image_id', f'data[{i}]')}"
    for key in _IMAGE_FIELDS:
        if key not in d:
            raise EvaluationInputError(f"{where}: missing field {key!r}")
    for key in ("height", "width"):
        if not is_int(d[key]) or d[key] <= 0:
            raise EvaluationInputError(f"{where}: field {key!r} must be a positive integer")
    segs, rels = d["segments_info"], d["relations"]
    if not isinstance(segs, list) or not isinstance(rels, list):
        raise EvaluationInputError(f"{where}: segments_info and relations must be lists")
    anns = d.get("annotations") or []
    ids = set()
    for j, s in enumerate(segs):
        if not isinstance(s, Mapping) or not is_int(s.get("id")) or s["id"] < 1:
            raise EvaluationInputError(f"{where}: segments_info[{j}].id must be an integer >= 1")
        if s["id"] in ids:
            raise EvaluationInputError(f"{where}: segments_info[{j}].id {s['id']} is repeated")
        ids.add(s["id"])
        src = anns[j] if j < len(anns) else s
        cat = src.get("category_id") if isinstance(src, Mapping) else None
        field = f"annotations[{j}]" if j < len(anns) else f"segments_info[{j}]"
        if not is_int(cat) or not 0 <= cat < num_classes:
            raise EvaluationInputError(
                f"{where}: {field}.category_id {cat!r} outside 0..{num_classes - 1}"
            )
    for r, row in enumerate(rels):
        if not isinstance(row, list) or len(row) != 3 or not all(is_int(v) for v in row):
            raise EvaluationInputError(
                f"{where}: relations[{r}] must be [subject, object, predicate] integers, "
                f"got {row!r}"
            )
        if not (0 <= row[0] < len(segs) and 0 <= row[1] < len(segs)):
            raise EvaluationInputError(
                f"{where}: relations[{r}] {row} index a segment outside 0..{len(segs) - 1}"
            )
        if not 0 <= row[2] < num_predicates:
            raise EvaluationInputError(
                f"{where}: relations[{r}] predicate {row[2]} outside 0..{num_predicates - 1}"
            )
    return str(d["image_id"])


def load_psg_split(
    json_file: str, seg_root: str, split: str = "test"
) -> Tuple[List[Dict], Dict[str, List[str]]]:
    """Read a psg.json the way the benchmark's test loader does.

    Images without relations are dropped first, then ``split`` is taken in file order ("test":
    image_id in test_image_ids; "val": in val_image_ids when the file has them; "train": the
    others). Segment labels come from ``annotations`` (one per segment) when present. Every image
    is validated (fields, integer relations in range, unique segment and image ids); an empty
    split is an error. Returns (dataset dicts in the docs/INTERFACES.md format with absolute
    pan_seg_file_name, class names {"thing_classes", "stuff_classes", "predicate_classes"}).
    Raises EvaluationInputError naming the file, the image id and the field.
    """
    if split not in ("test", "val", "train"):
        raise EvaluationInputError(f"split must be 'test', 'val' or 'train', got {split!r}")
    data = read_json(json_file, "ground truth")
    if not isinstance(data, Mapping):
        raise EvaluationInputError(f"{json_file}: top level must be an object")
    for key in ("data", "thing_classes", "stuff_classes", "predicate_classes"):
        if not isinstance(data.get(key), list):
            raise EvaluationInputError(f"{json_file}: missing or non-list top-level key {key!r}")
    split_ids = {
        name: set(str(i) for i in data.get(f"{name}_image_ids", [])) for name in ("test", "val")
    }
    if split == "val" and "val_image_ids" not in data:
        raise EvaluationInputError(
            f"{json_file}: split 'val' asked, but the file has no val_image_ids"
        )
    num_things = len(data["thing_classes"])
    num_classes = num_things + len(data["stuff_classes"])
    num_predicates = len(data["predicate_classes"])
    records, first_index = [], {}
    for i, d in enumerate(data["data"]):
        image_id = _check_image(d, i, json_file, num_classes, num_predicates)
        if image_id in first_index:
            raise EvaluationInputError(
                f"{json_file}: image {image_id}: image_id appears twice in the ground truth "
                f"(data[{first_index[image_id]}] and data[{i}])"
            )
        first_index[image_id] = i
        if len(d["relations"]) == 0:
            continue
        if split == "train":
            if image_id in split_ids["test"] or image_id in split_ids["val"]:
                continue
        elif image_id not in split_ids[split]:
            continue
        anns = d.get("annotations") or []
        segments = []
        for j, s in enumerate(d["segments_info"]):
            cat = int(anns[j]["category_id"]) if j < len(anns) else int(s["category_id"])
            seg = {
                "id": int(s["id"]),
                "category_id": cat,
                "iscrowd": int(s.get("iscrowd", 0)),
                "isthing": bool(s.get("isthing", cat < num_things)),
            }
            if "area" in s:
                seg["area"] = int(s["area"])
            segments.append(seg)
        records.append(
            {
                "image_id": image_id,
                "height": int(d["height"]),
                "width": int(d["width"]),
                "file_name": d.get("file_name", ""),
                "pan_seg_file_name": os.path.join(seg_root, str(d["pan_seg_file_name"])),
                "segments_info": segments,
                "relations": [list(map(int, r)) for r in d["relations"]],
            }
        )
    if not records:
        raise EvaluationInputError(
            f"{json_file}: the {split!r} split has no image with ground-truth relations "
            f"({len(data['data'])} images in the file): nothing to evaluate"
        )
    names = {k: list(data[k]) for k in ("thing_classes", "stuff_classes", "predicate_classes")}
    return records, names


def ov_split_indices(
    ov_split: Dict[str, Sequence[str]], class_names: Sequence[str], predicate_names: Sequence[str]
) -> Tuple[List[int], List[int]]:
    """(novel predicate indices, novel object category indices) of a split given by names."""
    out = []
    for key, vocab in (("novel_predicates", predicate_names), ("novel_objects", class_names)):
        index = {n: i for i, n in enumerate(vocab)}
        unknown = [n for n in ov_split.get(key, []) if n not in index]
        if unknown:
            raise EvaluationInputError(f"ov_split[{key!r}] names unknown classes: {unknown}")
        out.append(sorted(index[n] for n in ov_split.get(key, [])))
    return out[0], out[1]
