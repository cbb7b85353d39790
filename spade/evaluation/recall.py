"""Aggregate per-image match ranks (sgg_metrics.ImageRecord) into the relation metrics.

Shape shorthand: I images with ground-truth triplets, P predicates. All numbers are percent.

Metric keys, per protocol (K in ``ks``):
- ``R@K``, ``mR@K``: the benchmark's numbers (graph constraint; an image whose prediction has no
  relation rows is skipped; mR averages over ALL predicates, an absent one counting 0);
- ``R@K_strict``, ``mR@K_strict``: the same with skipped images counting 0;
- ``mR@K_present``: mean over the predicates present in the evaluated images only;
- ``ngR@K``, ``ngmR@K``: no graph constraint;
- ``R@K_near``, ``R@K_distant``: recall of triplets whose subject and object centres are at most /
  more than 1/3 of the image width apart (images without such triplets left out);
- with an open-vocabulary split: ``R@K_base`` / ``R@K_novel`` (a triplet is novel when its predicate
  or its subject or object category is novel) and ``mR@K_base`` / ``mR@K_novel`` (mean per-predicate
  recall over the base / novel predicates);
- ``R@<max K>-<predicate>``: per-predicate recall (nan when the predicate is absent);
- ``num_images``, ``num_images_strict``, ``num_images_without_relations``.
"""

from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .sgg_metrics import ImageRecord


class _Flat:
    """All ground-truth triplets of the evaluated images in flat arrays [M] (M = sum of R)."""

    def __init__(self, records: Sequence[ImageRecord], protocol: str):
        lengths = np.array([len(r.predicates) for r in records], dtype=np.int64)
        self.num_images = len(records)
        self.image = np.repeat(np.arange(len(records)), lengths)
        cat = lambda xs, dt: (
            np.concatenate(list(xs)).astype(dt) if len(records) else np.zeros(0, dt)
        )
        self.predicates = cat((r.predicates for r in records), np.int64)
        self.subject_labels = cat((r.subject_labels for r in records), np.int64)
        self.object_labels = cat((r.object_labels for r in records), np.int64)
        self.distant = cat((r.distant for r in records), bool)
        self.gc_rank = cat((r.gc_rank[protocol] for r in records), np.int64)
        self.ng_rank = cat((r.ng_rank[protocol] for r in records), np.int64)
        self.has_rows = np.array([r.num_rows[protocol] > 0 for r in records], dtype=bool)


def _per_image(flat: _Flat, ranks, k, images, num_predicates=0, keep=None):
    """Per-image recall [I] (nan: image not selected or no kept triplet), and triplet counts and
    hits per (image, predicate) [I, P] over the selected ``images`` [I] bool."""
    n = flat.num_images
    sel = images[flat.image] if keep is None else images[flat.image] & keep
    hit = (ranks < k) & sel
    count = np.bincount(flat.image, weights=sel, minlength=n).astype(np.float64)
    hits = np.bincount(flat.image, weights=hit, minlength=n).astype(np.float64)
    recall = np.divide(hits, count, out=np.full(n, np.nan), where=count > 0)
    if not num_predicates:
        return recall, None, None
    cell = flat.image * num_predicates + flat.predicates
    size = n * num_predicates
    counts = np.bincount(cell, weights=sel, minlength=size).astype(np.float64)
    hits_p = np.bincount(cell, weights=hit, minlength=size).astype(np.float64)
    return recall, counts.reshape(n, num_predicates), hits_p.reshape(n, num_predicates)


def _per_predicate(counts: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """Per-predicate mean over images containing it of the per-image recall -> [P] (nan: absent)."""
    present = counts > 0
    ratio = np.divide(hits, counts, out=np.zeros_like(hits), where=present)
    num = present.sum(0)
    return np.divide(ratio.sum(0), num, out=np.full(num.shape, np.nan), where=num > 0)


def _mean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean() * 100) if len(values) else float("nan")


def _vocabulary_mean(per_predicate: np.ndarray) -> float:
    """The benchmark's mR: mean over the whole vocabulary, an absent predicate counting 0."""
    return float(np.nan_to_num(per_predicate).sum() / len(per_predicate) * 100)


def summarize(
    records: Sequence[ImageRecord],
    predicate_names: Sequence[str],
    protocol: str = "multi",
    ks: Sequence[int] = (20, 50, 100),
    novel_predicates: Optional[Sequence[int]] = None,
    novel_objects: Optional[Sequence[int]] = None,
) -> Tuple["OrderedDict[str, float]", Dict[str, Dict[str, float]]]:
    """Relation metrics of one protocol over image records.

    Returns (metrics, per_predicate) where per_predicate maps a predicate name to
    {"R@K": percent or nan, ..., "num_triplets": count over the evaluated images}.
    """
    num_p = len(predicate_names)
    recs = [r for r in records if len(r.predicates) > 0]
    for r in recs:
        if r.predicates.max() >= num_p:
            raise ValueError(
                f"image {r.image_id}: ground-truth predicate out of range 0..{num_p - 1}"
            )
    flat = _Flat(recs, protocol)
    standard, strict = flat.has_rows, np.ones(flat.num_images, dtype=bool)
    out: "OrderedDict[str, float]" = OrderedDict()
    per_pred_k: Dict[int, np.ndarray] = {}
    novel_p = np.zeros(num_p, dtype=bool)
    novel_p[list(novel_predicates or [])] = True
    novel_triplet = novel_p[flat.predicates]
    novel_triplet |= np.isin(flat.subject_labels, list(novel_objects or []))
    novel_triplet |= np.isin(flat.object_labels, list(novel_objects or []))

    for k in ks:
        rec_k, counts, hits = _per_image(flat, flat.gc_rank, k, standard, num_p)
        per_pred_k[k] = _per_predicate(counts, hits)
        out[f"R@{k}"] = _mean(rec_k)
        out[f"mR@{k}"] = _vocabulary_mean(per_pred_k[k])
    for k in ks:
        rec_k, counts, hits = _per_image(flat, flat.gc_rank, k, strict, num_p)
        out[f"R@{k}_strict"] = _mean(rec_k)
        out[f"mR@{k}_strict"] = _vocabulary_mean(_per_predicate(counts, hits))
    for k in ks:
        out[f"mR@{k}_present"] = _mean(per_pred_k[k])
    for k in ks:
        rec_k, counts, hits = _per_image(flat, flat.ng_rank, k, standard, num_p)
        out[f"ngR@{k}"] = _mean(rec_k)
        out[f"ngmR@{k}"] = _vocabulary_mean(_per_predicate(counts, hits))
    for name, keep in (("near", ~flat.distant), ("distant", flat.distant)):
        for k in ks:
            out[f"R@{k}_{name}"] = _mean(_per_image(flat, flat.gc_rank, k, standard, 0, keep)[0])
    if novel_predicates is not None or novel_objects is not None:
        for name, keep, group in (
            ("base", ~novel_triplet, ~novel_p),
            ("novel", novel_triplet, novel_p),
        ):
            for k in ks:
                rec_k = _per_image(flat, flat.gc_rank, k, standard, 0, keep)[0]
                out[f"R@{k}_{name}"] = _mean(rec_k)
                group_recall = np.nan_to_num(per_pred_k[k][group])
                out[f"mR@{k}_{name}"] = (
                    float(group_recall.mean() * 100) if group.any() else float("nan")
                )
    top_k = max(ks)
    for p, name in enumerate(predicate_names):
        out[f"R@{top_k}-{name}"] = float(per_pred_k[top_k][p] * 100)
    out["num_images"] = float(standard.sum())
    out["num_images_strict"] = float(len(recs))
    out["num_images_without_relations"] = float(len(recs) - standard.sum())
    num_triplets = np.bincount(
        flat.predicates, weights=standard[flat.image], minlength=num_p
    ).astype(np.int64)
    per_predicate = {
        name: {
            **{f"R@{k}": float(per_pred_k[k][p] * 100) for k in ks},
            "num_triplets": num_triplets[p],
        }
        for p, name in enumerate(predicate_names)
    }
    return out, per_predicate
