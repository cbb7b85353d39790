"""One pass per image: each panoptic map decoded once, one joint pixel histogram, and from it both
the mask IoUs of relation matching and panopticapi's PQ matching.

Shape shorthand: N ground-truth segments, S predicted segment entries, U distinct predicted ids,
H x W image. An index map gives every pixel its segment's position among the listed ids:
0..N-1 listed, N void (id 0), N + 1 an id listed nowhere. The joint histogram [U + 2, N + 2]
counts pixels per (predicted position, ground-truth position).
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .panoptic import image_pq_stats
from .sgg_metrics import GroundTruthGraph, ImageRecord, PredictedGraph, score_image

# ids below this are mapped through a lookup table, larger ones (COCO colours) by binary search
_LUT_IDS = 1 << 20


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic ids [H, W] uint32 (R + 256 G + 256^2 B) of an RGB array [H, W, 3] uint8."""
    h, w = rgb.shape[:2]
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[..., :3] = rgb
    return rgba.view("<u4")[..., 0]


def ids_to_rgb(seg: np.ndarray) -> np.ndarray:
    """RGB array [H, W, 3] uint8 of ids [H, W] in 0..256^3-1 (inverse of rgb_to_ids)."""
    ids = np.ascontiguousarray(seg, dtype="<u4")
    return ids[..., None].view(np.uint8)[..., :3].copy()


def decode_panoptic_png(source) -> np.ndarray:
    """Segment-id map [H, W] uint32 of a COCO-panoptic RGB PNG (a path or a binary file)."""
    with Image.open(source) as img:
        if img.mode != "RGB":
            img = img.convert("RGB")
        rgb = np.asarray(img)
    return rgb_to_ids(rgb)


def index_map(seg: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Flat [H*W] intp position of each pixel's id among distinct ``ids`` [N] (>= 1): N for void
    (0), N + 1 for an id not in ``ids``."""
    flat = seg.reshape(-1)
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    top = int(flat.max(initial=0))
    if top < _LUT_IDS:
        lut = np.full(top + 1, n + 1, dtype=np.intp)
        inside = ids <= top
        lut[ids[inside]] = np.flatnonzero(inside)
        lut[0] = n
        return lut[flat]
    out = np.full(flat.shape, n + 1, dtype=np.intp)
    if n:
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        if sorted_ids[-1] <= np.iinfo(flat.dtype).max:
            sorted_ids = sorted_ids.astype(flat.dtype)
        pos = np.minimum(np.searchsorted(sorted_ids, flat), n - 1)
        hit = sorted_ids[pos] == flat
        out[hit] = order[pos[hit]]
    out[flat == 0] = n
    return out


def joint_histogram(
    pred_seg: np.ndarray, pred_ids: np.ndarray, gt_seg: np.ndarray, gt_ids: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """(joint [U + 2, N + 2] int64 pixel counts, ground-truth index map [H*W]) of distinct ids."""
    u, n = len(pred_ids), len(gt_ids)
    gt_index = index_map(gt_seg, gt_ids)
    key = index_map(pred_seg, pred_ids)
    key *= n + 2
    key += gt_index
    joint = np.bincount(key, minlength=(u + 2) * (n + 2)).reshape(u + 2, n + 2)
    return joint, gt_index


def listing_problems(
    seg: np.ndarray, ids: np.ndarray, areas: np.ndarray, unlisted: int, png: str, listing: str
) -> List[str]:
    """Both-way check of a PNG against its segments_info (as panopticapi checks predictions):
    ids with pixels but no entry, and entries without pixels. areas [len(ids)] pixel counts,
    unlisted: count of pixels whose id has no entry."""
    problems = []
    if unlisted:
        flat = seg.reshape(-1)
        extra = np.unique(flat[(flat != 0) & ~np.isin(flat, ids)])
        problems.append(
            f"{png} has segment id(s) {extra[:5].tolist()} not in {listing} segments_info"
        )
    empty = np.asarray(ids)[np.asarray(areas) == 0]
    if len(empty):
        problems.append(
            f"{listing} segments_info id(s) {empty[:5].tolist()} have no pixel in {png}"
        )
    return problems


def evaluate_image(
    gt: GroundTruthGraph,
    pred: PredictedGraph,
    protocols: Sequence[str],
    iou_threshold: float,
    max_k: int,
    num_predicates: int,
    panoptic: bool = True,
    files: Optional[Tuple[str, str, str, str]] = None,
) -> Tuple[Optional[ImageRecord], Optional[np.ndarray], List[str]]:
    """Relation ranks and PQ statistics of one image from one joint histogram.

    gt.seg and pred.seg are the decoded maps [H, W]; predicted entries sharing an id share a mask
    (PQ keeps the first entry's category). files = (ground-truth PNG, ground-truth listing,
    predicted PNG, predicted listing) turns on the both-way PNG / segments_info check of
    user-handed files (model outputs are not checked: unlisted pixels count as no segment).
    Returns (ImageRecord, PQ rows of panoptic.image_pq_stats or None, problems); with problems
    the first two are None.
    """
    keys = np.asarray(pred.segment_ids, dtype=np.int64)
    unique_ids, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    gt_ids = np.asarray(gt.segment_ids, dtype=np.int64)
    u, n = len(unique_ids), len(gt_ids)
    joint, gt_index = joint_histogram(pred.seg, unique_ids, gt.seg, gt_ids)
    area_p, area_g = joint[:u].sum(1), joint[:, :n].sum(0)
    if files is not None:
        where = f"image {gt.image_id}: "
        problems = listing_problems(gt.seg, gt_ids, area_g, joint[:, n + 1].sum(), *files[:2])
        problems += listing_problems(pred.seg, unique_ids, area_p, joint[u + 1].sum(), *files[2:])
        if problems:
            return None, None, [where + p for p in problems]
    inter = joint[:u, :n]
    union = area_p[:, None] + area_g[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)
    record = score_image(
        gt,
        pred,
        protocols,
        iou_threshold,
        max_k,
        False,
        num_predicates,
        iou=iou[inverse.reshape(-1)],
        gt_index=gt_index,
    )
    if not panoptic:
        return record, None, []
    stats = image_pq_stats(
        joint,
        np.asarray(pred.labels, dtype=np.int64)[first],
        gt.labels,
        area_g if gt.areas is None else gt.areas,
        np.zeros(n, dtype=bool) if gt.iscrowd is None else gt.iscrowd,
    )
    return record, stats, []
