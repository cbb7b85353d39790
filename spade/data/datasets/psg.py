"""Register PSG-format datasets (psg.json + images + COCO-RGB panoptic PNGs) with detectron2.

Split rules (PSG_PROTOCOL.md):
* ``train``: images in neither ``test_image_ids`` nor ``val_image_ids``; images without relations
  are dropped (the count is logged).
* ``val``: ``val_image_ids`` when the file has them, else the test images (PSG has no val split).
* ``test``: ``test_image_ids``; images without relations are dropped (logged); exact duplicate
  triplets are removed (first kept), one pair may keep several predicates.
* ``all``: every image, unfiltered.
Open vocabulary (``ov_split``, training only): relations with a novel predicate are dropped;
segments of novel categories are removed from ``segments_info`` (their pixels are then unlabelled,
like void, so a novel object never reaches the loss as a known class) together with every relation
that uses them, and relation indices are remapped. Category and predicate ids stay those of the full
vocabulary. Images left without relations are dropped (logged).

Validation (eager, while loading): malformed JSON, missing keys, non-integer ids and indices,
relation rows that are not 3 ints, category / predicate / relation indices out of range, repeated
image or segment ids, repeated class names, and (``check_files=True``) missing image or PNG files
raise ``ValueError`` / ``FileNotFoundError`` naming the file, the image id and the field. The PNG
is checked against ``segments_info`` both ways (as panopticapi does) lazily by
:class:`spade.data.dataset_mapper.SPADEDatasetMapper`, which reads the PNG anyway; segments
removed by the open-vocabulary filter are listed in ``void_segment_ids``.
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "register_psg",
    "read_json",
    "load_psg_json",
    "load_ov_split",
    "apply_ov_filter",
    "class_colors",
    "all_class_names",
    "write_panoptic_json",
    "psg_metadata",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")
_TOP_KEYS = ("data", "thing_classes", "stuff_classes", "predicate_classes", "test_image_ids")
_IMAGE_KEYS = (
    "file_name",
    "height",
    "width",
    "image_id",
    "pan_seg_file_name",
    "segments_info",
    "relations",
)
_SEGMENT_KEYS = ("id", "category_id")
_OV_KEYS = ("base_objects", "novel_objects", "base_predicates", "novel_predicates")


def all_class_names(meta) -> List[str]:
    """thing_classes + stuff_classes of a metadata object (contiguous id order)."""
    return list(meta.thing_classes) + list(getattr(meta, "stuff_classes", []) or [])


def class_colors(n: int, offset: int = 0) -> List[List[int]]:
    """``n`` distinct deterministic RGB colours (golden-ratio hue walk; ``offset`` shifts it)."""
    out = []
    for i in range(offset, offset + n):
        h = (i * 0.618033988749895) % 1.0
        s, v = 0.55 + 0.4 * ((i * 7) % 3) / 2, 0.65 + 0.3 * ((i * 5) % 4) / 3
        out.append([int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)])
    return out


def read_json(path: str, what: str = "annotation file"):
    """``json.load`` of ``path``; a missing, unreadable or malformed file is a one-line error
    naming the file (and line / column of a syntax error)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_class_lists(psg: dict, json_file: str) -> None:
    """thing_classes / stuff_classes / predicate_classes: lists of distinct non-empty names."""
    names = []
    for key in ("thing_classes", "stuff_classes", "predicate_classes"):
        value = psg[key]
        if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
            raise ValueError(f"{json_file}: field {key!r} must be a list of non-empty strings")
        if key == "predicate_classes":
            if not value:
                raise ValueError(f"{json_file}: field 'predicate_classes' is empty")
            dup = sorted({n for n in value if value.count(n) > 1})
        else:
            names += value
            dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"{json_file}: field {key!r} names {dup} more than once")


def load_ov_split(path: str) -> Dict[str, List[str]]:
    """Read an open-vocabulary split json with keys base_/novel_ objects and predicates."""
    split = read_json(path, "open-vocabulary split")
    for key in _OV_KEYS:
        if key not in split or not isinstance(split[key], list):
            raise ValueError(f"{path}: open-vocabulary split lacks the list {key!r}")
    return {k: list(split[k]) for k in _OV_KEYS}


def _err(json_file: str, image_id, msg: str) -> ValueError:
    return ValueError(f"{json_file}: image_id {image_id}: {msg}")


def _check_image(rec: dict, json_file: str, n_classes: int, n_preds: int) -> None:
    if not isinstance(rec, dict):
        raise ValueError(f"{json_file}: an entry of 'data' is {type(rec).__name__}, not an object")
    image_id = rec.get("image_id", "<missing>")
    for key in _IMAGE_KEYS:
        if key not in rec:
            raise _err(json_file, image_id, f"missing field {key!r}")
    for key in ("height", "width"):
        if not _is_int(rec[key]) or rec[key] <= 0:
            raise _err(json_file, image_id, f"field {key!r} = {rec[key]!r} is not a positive int")
    for key in ("segments_info", "relations"):
        if not isinstance(rec[key], list):
            raise _err(json_file, image_id, f"field {key!r} is not a list")
    n_seg = len(rec["segments_info"])
    seen_ids = set()
    for k, seg in enumerate(rec["segments_info"]):
        for key in _SEGMENT_KEYS:
            if key not in seg:
                raise _err(json_file, image_id, f"segments_info[{k}] missing field {key!r}")
            if not _is_int(seg[key]):
                raise _err(
                    json_file, image_id, f"segments_info[{k}].{key} = {seg[key]!r} is not an int"
                )
        if seg["id"] <= 0:
            raise _err(json_file, image_id, f"segments_info[{k}].id {seg['id']} is not >= 1")
        if seg["id"] in seen_ids:
            raise _err(json_file, image_id, f"segments_info[{k}].id {seg['id']} is repeated")
        seen_ids.add(seg["id"])
        if not 0 <= int(seg["category_id"]) < n_classes:
            raise _err(
                json_file,
                image_id,
                f"segments_info[{k}].category_id "
                f"{seg['category_id']} is not a known category (0..{n_classes - 1})",
            )
    for k, rel in enumerate(rec["relations"]):
        if not isinstance(rel, list) or len(rel) != 3 or not all(_is_int(v) for v in rel):
            raise _err(
                json_file,
                image_id,
                f"relations[{k}] = {rel!r} is not [subject, object, predicate] of 3 ints",
            )
        s, o, p = rel
        if not (0 <= s < n_seg and 0 <= o < n_seg):
            raise _err(
                json_file,
                image_id,
                f"relations[{k}] = {rel}: segment index out of range (image has {n_seg} segments)",
            )
        if not 0 <= p < n_preds:
            raise _err(
                json_file,
                image_id,
                f"relations[{k}] = {rel}: predicate index out of range (0..{n_preds - 1})",
            )
    if "annotations" in rec and len(rec["annotations"]) != n_seg:
        raise _err(
            json_file,
            image_id,
            f"annotations has {len(rec['annotations'])} entries for {n_seg} segments_info",
        )


def _to_dict(rec: dict, image_root: str, seg_root: str, n_things: int) -> dict:
    segs = []
    anns = rec.get("annotations")
    for k, seg in enumerate(rec["segments_info"]):
        cat = int(seg["category_id"])
        out = {
            "id": int(seg["id"]),
            "category_id": cat,
            "iscrowd": int(seg.get("iscrowd", 0)),
            "isthing": cat < n_things,
            "area": int(seg.get("area", 0)),
        }
        if anns is not None:
            out["bbox"] = [float(v) for v in anns[k]["bbox"]]
        segs.append(out)
    return {
        "file_name": os.path.join(image_root, rec["file_name"]),
        "height": int(rec["height"]),
        "width": int(rec["width"]),
        "image_id": str(rec["image_id"]),
        "pan_seg_file_name": os.path.join(seg_root, rec["pan_seg_file_name"]),
        "segments_info": segs,
        "relations": [[int(v) for v in r] for r in rec["relations"]],
    }


def dedupe_relations(relations: Sequence[Sequence[int]]) -> List[List[int]]:
    """Remove exact duplicate triplets, keeping the first occurrence order."""
    seen, out = set(), []
    for r in relations:
        key = tuple(int(v) for v in r)
        if key not in seen:
            seen.add(key)
            out.append(list(key))
    return out


def apply_ov_filter(d: dict, novel_categories: set, novel_predicates: set) -> dict:
    """Training-time open-vocabulary filter of one dataset dict (ids, not names); returns a copy."""
    keep = [k for k, s in enumerate(d["segments_info"]) if s["category_id"] not in novel_categories]
    remap = {old: new for new, old in enumerate(keep)}
    rels = [
        [remap[s], remap[o], p]
        for s, o, p in d["relations"]
        if s in remap and o in remap and p not in novel_predicates
    ]
    void = [s["id"] for k, s in enumerate(d["segments_info"]) if k not in remap]
    return dict(
        d,
        segments_info=[d["segments_info"][k] for k in keep],
        relations=rels,
        void_segment_ids=list(d.get("void_segment_ids", [])) + void,
    )


def _names_to_ids(names: Sequence[str], vocab: Sequence[str], what: str, source: str) -> set:
    index = {n: i for i, n in enumerate(vocab)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ValueError(f"{source}: open-vocabulary split names unknown {what} {unknown}")
    return {index[n] for n in names}


def _check_top_level(psg, json_file: str) -> None:
    if not isinstance(psg, dict):
        raise ValueError(f"{json_file}: top level is {type(psg).__name__}, not an object")
    for key in _TOP_KEYS:
        if key not in psg:
            raise ValueError(f"{json_file}: missing top-level field {key!r}")
    if not isinstance(psg["data"], list):
        raise ValueError(f"{json_file}: field 'data' is not a list")
    check_class_lists(psg, json_file)


def load_psg_json(
    json_file: str,
    image_root: str,
    seg_root: str,
    split: str,
    ov_split: Optional[Dict[str, List[str]]] = None,
    check_files: bool = True,
    dataset_name: str = "",
    expected_classes: Optional[dict] = None,
) -> List[dict]:
    """Load one split of a psg.json as detectron2 dataset dicts (docs/INTERFACES.md format).

    ``expected_classes`` ({thing_classes, stuff_classes, predicate_classes}) must equal the file's
    class lists when given.
    """
    if split not in SPLITS:
        raise ValueError(f"{json_file}: unknown split {split!r}; expected one of {SPLITS}")
    psg = read_json(json_file, "PSG annotation file")
    _check_top_level(psg, json_file)
    things, stuff, preds = psg["thing_classes"], psg["stuff_classes"], psg["predicate_classes"]
    for key in expected_classes or {}:
        if list(psg[key]) != list(expected_classes[key]):
            raise ValueError(
                f"{json_file}: field {key!r} differs from the classes dataset "
                f"{dataset_name!r} was registered with"
            )
    test_ids = {str(i) for i in psg["test_image_ids"]}
    val_ids = {str(i) for i in psg.get("val_image_ids", [])}
    if split == "train":
        wanted = lambda i: i not in test_ids and i not in val_ids  # noqa: E731
    elif split == "test" or (split == "val" and not val_ids):
        wanted = lambda i: i in test_ids  # noqa: E731
    elif split == "val":
        wanted = lambda i: i in val_ids  # noqa: E731
    else:
        wanted = lambda i: True  # noqa: E731

    dicts = []
    seen_images = set()
    for rec in psg["data"]:
        _check_image(rec, json_file, len(things) + len(stuff), len(preds))
        if str(rec["image_id"]) in seen_images:
            raise _err(json_file, rec["image_id"], "image_id is repeated in 'data'")
        seen_images.add(str(rec["image_id"]))
        if not wanted(str(rec["image_id"])):
            continue
        d = _to_dict(rec, image_root, seg_root, len(things))
        if check_files:
            for key in ("file_name", "pan_seg_file_name"):
                if not os.path.isfile(d[key]):
                    raise FileNotFoundError(
                        f"{json_file}: image_id {d['image_id']}: {key} {d[key]} does not exist"
                    )
        dicts.append(d)

    if ov_split is not None and split == "train":
        novel_c = _names_to_ids(
            ov_split["novel_objects"], list(things) + list(stuff), "categories", json_file
        )
        novel_p = _names_to_ids(ov_split["novel_predicates"], preds, "predicates", json_file)
        dicts = [apply_ov_filter(d, novel_c, novel_p) for d in dicts]
    if split in ("test", "val"):
        for d in dicts:
            d["relations"] = dedupe_relations(d["relations"])
    if split != "all":
        kept = [d for d in dicts if d["relations"]]
        if len(kept) < len(dicts):
            logger.info(
                "%s (%s, split %s): dropped %d of %d images without relations",
                dataset_name or json_file,
                json_file,
                split,
                len(dicts) - len(kept),
                len(dicts),
            )
        dicts = kept
    return dicts


def write_panoptic_json(dicts: List[dict], meta, path: str) -> str:
    """Write the COCO-panoptic json of ``dicts`` for panopticapi's pq_compute (atomically).

    ``file_name`` entries are relative to ``meta.panoptic_root``; category ids are the contiguous
    ids of the dataset.
    """
    names = all_class_names(meta)
    n_things = len(meta.thing_classes)
    root = meta.panoptic_root
    images, annotations = [], []
    for d in dicts:
        rel = os.path.relpath(d["pan_seg_file_name"], root)
        images.append(
            {
                "id": d["image_id"],
                "file_name": os.path.basename(d["file_name"]),
                "height": d["height"],
                "width": d["width"],
            }
        )
        annotations.append(
            {
                "image_id": d["image_id"],
                "file_name": rel,
                "segments_info": [
                    {
                        "id": s["id"],
                        "category_id": s["category_id"],
                        "iscrowd": s["iscrowd"],
                        "area": s["area"],
                        "bbox": s.get("bbox", [0, 0, 0, 0]),
                    }
                    for s in d["segments_info"]
                ],
            }
        )
    cats = [
        {"id": i, "name": n, "isthing": int(i < n_things), "supercategory": ""}
        for i, n in enumerate(names)
    ]
    out = {"images": images, "annotations": annotations, "categories": cats}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, path)
    return path


def psg_metadata(
    thing_classes, stuff_classes, predicate_classes, ov_split=None, predicate_flip_map=None
) -> dict:
    """The metadata fields of docs/INTERFACES.md derived from the class lists."""
    n_t, n_s = len(thing_classes), len(stuff_classes)
    meta = {
        "thing_classes": list(thing_classes),
        "stuff_classes": list(stuff_classes),
        "predicate_classes": list(predicate_classes),
        "thing_dataset_id_to_contiguous_id": {i: i for i in range(n_t)},
        "stuff_dataset_id_to_contiguous_id": {i: i for i in range(n_t, n_t + n_s)},
        "thing_colors": class_colors(n_t),
        "stuff_colors": class_colors(n_s, offset=n_t),
        "evaluator_type": "psg",
        "predicate_flip_map": [
            tuple(p)
            for p in (predicate_flip_map or [])
            if p[0] in predicate_classes and p[1] in predicate_classes
        ],
    }
    if ov_split is not None:
        meta["ov_split"] = {k: list(ov_split[k]) for k in _OV_KEYS}
    return meta


DEFAULT_FLIP_MAP = [("left of", "right of"), ("on left of", "on right of")]


def register_psg(
    name: str,
    json_file: str,
    image_root: str,
    seg_root: str,
    split: str,
    ov_split: Optional[Dict[str, List[str]] | str] = None,
    classes: Optional[dict] = None,
    predicate_flip_map=None,
    panoptic_json: Optional[str] = None,
    check_files: bool = True,
) -> None:
    """Register dataset ``name`` (a PSG split) in DatasetCatalog and MetadataCatalog.

    Args:
        json_file / image_root / seg_root: psg.json and the roots its relative file names use.
        split: "train", "val", "test" or "all" (rules in the module docstring).
        ov_split: dict of base_/novel_ names or a path to such a json; None = closed set.
        classes: {"thing_classes", "stuff_classes", "predicate_classes"} to avoid reading
            ``json_file`` now; None reads them from the file (the loader checks they agree).
        predicate_flip_map: (name, name) pairs swapped on horizontal flip (default left/right of).
        panoptic_json: where the loader writes the COCO-panoptic json of the split
            (default ``<dir of json_file>/panoptic_<name>.json``).
    """
    if split not in SPLITS:
        raise ValueError(f"register_psg({name!r}): unknown split {split!r}; expected {SPLITS}")
    if isinstance(ov_split, str):
        ov_split = load_ov_split(ov_split)
    if classes is None:
        psg = read_json(json_file, f"register_psg({name!r}): annotation file")
        _check_top_level(psg, json_file)
        classes = {k: psg[k] for k in ("thing_classes", "stuff_classes", "predicate_classes")}
    meta = psg_metadata(
        classes["thing_classes"],
        classes["stuff_classes"],
        classes["predicate_classes"],
        ov_split,
        DEFAULT_FLIP_MAP if predicate_flip_map is None else predicate_flip_map,
    )
    panoptic_json = panoptic_json or os.path.join(
        os.path.dirname(os.path.abspath(json_file)), f"panoptic_{name}.json"
    )

    def load() -> List[dict]:
        dicts = load_psg_json(
            json_file,
            image_root,
            seg_root,
            split,
            ov_split,
            check_files,
            name,
            expected_classes=classes,
        )
        write_panoptic_json(dicts, MetadataCatalog.get(name), panoptic_json)
        return dicts

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        seg_root=seg_root,
        panoptic_json=panoptic_json,
        panoptic_root=seg_root,
        box_only=False,
        split=split,
        **meta,
    )
