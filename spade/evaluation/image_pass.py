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
        # Pillow keeps RGB pixels as 4 bytes (R, G, B, pad): one copy, then drop the pad byte
        ids = np.frombuffer(img.tobytes("raw", "RGBX"), dtype="<u4").reshape(img.height, img.width)
    return ids & np.uint32(0xFFFFFF)


def index_map(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """intp position [M] of each of ``values`` [M] (segment ids, flattened) among distinct ``ids``
    [N] (>= 1): N for void (0), N + 1 for an id not in ``ids``."""
    values = values.reshape(-1)
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    out = np.full(values.shape, n + 1, dtype=np.intp)
    if n:
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        pos = np.minimum(np.searchsorted(sorted_ids, values), n - 1)
        hit = sorted_ids[pos] == values
        out[hit] = order[pos[hit]]
    out[values == 0] = n
    return out


def pair_runs(gt_seg: np.ndarray, pred_seg: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Runs of pixels along each row with one (ground truth, prediction) id pair.

    Returns (starts [M] flat pixel index, lengths [M]); M is a few per row and segment boundary,
    so everything after this works on M runs instead of H*W pixels.
    """
    width = gt_seg.shape[1]
    g, p = gt_seg.reshape(-1), pred_seg.reshape(-1)
    change = g[1:] != g[:-1]
    change |= p[1:] != p[:-1]
    change[width - 1 :: width] = True  # a run never crosses a row end
    starts = np.flatnonzero(change)
    starts += 1
    starts = np.concatenate([np.zeros(1, dtype=starts.dtype), starts])
    return starts, np.diff(np.append(starts, g.size))


def joint_histogram(
    pred_seg: np.ndarray, pred_ids: np.ndarray, gt_seg: np.ndarray, gt_ids: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """(joint [U + 2, N + 2] int64 pixel counts, ground-truth centres [N, 2] (x, y), NaN when
    empty) of distinct ids, from the pixel runs of the two maps."""
    u, n = len(pred_ids), len(gt_ids)
    starts, lengths = pair_runs(gt_seg, pred_seg)
    gt_index = index_map(gt_seg.reshape(-1)[starts], gt_ids)
    key = index_map(pred_seg.reshape(-1)[starts], pred_ids)
    key *= n + 2
    key += gt_index
    joint = np.bincount(key, weights=lengths, minlength=(u + 2) * (n + 2))
    joint = joint.astype(np.int64).reshape(u + 2, n + 2)
    y, x0 = np.divmod(starts, gt_seg.shape[1])
    sum_x = np.bincount(gt_index, weights=lengths * (x0 + (lengths - 1) / 2), minlength=n + 2)
    sum_y = np.bincount(gt_index, weights=lengths * y, minlength=n + 2)
    area = joint[:, :n].sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        centers = np.stack([sum_x[:n] / area, sum_y[:n] / area], axis=1)
    return joint, centers


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
    joint, centers = joint_histogram(pred.seg, unique_ids, gt.seg, gt_ids)
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
        centers=centers,
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
