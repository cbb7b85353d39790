"""Set criterion of the panoptic head: cross-entropy + point-sampled BCE and dice mask losses.

Shape shorthand: B batch, Q queries, K classes (+1 no-object), N ground-truth segments of an image,
P sampled points, h x w predicted masks, H x W target masks.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from torch import Tensor, nn

from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "dice_loss", "sigmoid_bce_loss"]

Indices = List[Tuple[Tensor, Tensor]]


def dice_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Smoothed dice loss summed over masks / num_masks: logits, targets [n, P]."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_bce_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Point-mean BCE summed over masks / num_masks: logits, targets [n, P]."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def _uncertainty(logits: Tensor) -> Tensor:
    """Points whose logit is near 0 are the most uncertain: [n, 1, P] -> [n, 1, P]."""
    return -logits.abs()


class SetCriterion(nn.Module):
    """Matches queries to ground truth (per decoder layer when deep supervision is on) and returns
    weighted losses ``loss_ce``, ``loss_mask``, ``loss_dice`` for the final layer and the same with
    suffix ``_{i}`` for intermediate prediction i.
    """

    def __init__(
        self,
        *,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        void_query_share: float = 0.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        num_aux_outputs: int = 0,
    ):
        """
        Args:
            matcher: the Hungarian matcher.
            class_weight, mask_weight, dice_weight: weights of the three loss terms.
            no_object_weight: cross-entropy weight of the no-object class.
            void_query_share: > 0: an unmatched query with at least this share of its predicted
                mask (sigmoid mass) on the target's ``void`` pixels is left out of the class loss
                (an open-vocabulary split leaves its novel objects unlabelled: a query that finds
                one is not taught "no object"); 0 = every unmatched query targets no-object.
            num_points, oversample_ratio, importance_sample_ratio: importance point sampling.
            num_aux_outputs: intermediate predictions supervised (0 = final layer only).
        """
        super().__init__()
        self.matcher = matcher
        self.no_object_weight = no_object_weight
        if not 0.0 <= void_query_share <= 1.0:
            raise ValueError(
                f"MODEL.SPADE.MASK_HEAD.VOID_QUERY_SHARE must lie in [0, 1], got {void_query_share}"
            )
        self.void_query_share = void_query_share
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.num_aux_outputs = num_aux_outputs
        base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.weight_dict = dict(base)
        for i in range(num_aux_outputs):
            self.weight_dict.update({f"{k}_{i}": v for k, v in base.items()})

    def num_masks(self, targets: Sequence[Dict[str, Tensor]], device) -> float:
        """Ground-truth segments per process (averaged over processes), at least 1."""
        count = torch.as_tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return max(float(count), 1.0)

    @torch.no_grad()
    def void_queries(self, mask_logits: Tensor, targets, indices: Indices) -> Tensor:
        """bool [B, Q]: unmatched queries with at least ``void_query_share`` of their mask's
        sigmoid mass on the target's ``void`` pixels (pooled to the prediction's grid)."""
        out = torch.zeros(mask_logits.shape[:2], dtype=torch.bool, device=mask_logits.device)
        for b, (q_idx, _) in enumerate(indices):
            void = targets[b].get("void")
            if void is None or not bool(void.any()):
                continue
            share = F.adaptive_avg_pool2d(void[None, None].float(), mask_logits.shape[-2:])[0, 0]
            probs = mask_logits[b].float().sigmoid()  # [Q, h, w]
            on_void = (probs * share.to(probs.device)).flatten(1).sum(1)
            on_void = on_void / probs.flatten(1).sum(1).clamp_min(1e-6)
            out[b] = on_void >= self.void_query_share
            out[b, q_idx.to(out.device)] = False  # matched queries always keep their class
        return out

    def loss_labels(
        self, logits: Tensor, targets, indices: Indices, mask_logits: Optional[Tensor] = None
    ) -> Tensor:
        """Cross-entropy over K+1 classes; unmatched queries target no-object (index K), except,
        with ``void_query_share`` > 0 (and ``mask_logits`` [B, Q, h, w] given), those on void
        pixels (:meth:`void_queries`), which are left out of the weighted mean."""
        num_classes = logits.shape[-1] - 1
        target_classes = torch.full(
            logits.shape[:2], num_classes, dtype=torch.long, device=logits.device
        )
        for b, (q_idx, gt_idx) in enumerate(indices):
            target_classes[b, q_idx.to(logits.device)] = targets[b]["labels"][
                gt_idx.to(logits.device)
            ]
        weight = torch.ones(num_classes + 1, device=logits.device, dtype=logits.dtype)
        weight[-1] = self.no_object_weight
        if self.void_query_share <= 0 or mask_logits is None:
            return F.cross_entropy(logits.transpose(1, 2), target_classes, weight)
        # the weighted mean of F.cross_entropy, with the void queries' weights set to 0
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, reduction="none")
        w = weight[target_classes] * (~self.void_queries(mask_logits, targets, indices)).to(loss)
        return (loss * w).sum() / w.sum().clamp_min(1e-12)

    def loss_masks(self, mask_logits: Tensor, targets, indices: Indices, num_masks: float):
        """BCE and dice on importance-sampled points of the matched masks."""
        src = torch.cat(
            [mask_logits[b, q.to(mask_logits.device)] for b, (q, _) in enumerate(indices)]
        )
        if src.shape[0] == 0:
            zero = mask_logits.sum() * 0.0  # keeps every parameter in the graph
            return zero, zero
        tgt = torch.cat(
            [targets[b]["masks"][g.to(mask_logits.device)] for b, (_, g) in enumerate(indices)]
        )
        src, tgt = src[:, None], tgt[:, None].to(src.dtype)
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src,
                _uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            labels = point_sample(tgt, coords, align_corners=False)[:, 0]
        point_logits = point_sample(src, coords, align_corners=False)[:, 0]
        return sigmoid_bce_loss(point_logits, labels, num_masks), dice_loss(
            point_logits, labels, num_masks
        )

    def layer_losses(self, outputs: Dict[str, Tensor], targets, num_masks: float, suffix: str = ""):
        """Match one prediction and return ({"loss_ce"+suffix, ...} unweighted, indices)."""
        indices = self.matcher(outputs, targets)
        loss_mask, loss_dice = self.loss_masks(outputs["pred_masks"], targets, indices, num_masks)
        losses = {
            "loss_ce" + suffix: self.loss_labels(
                outputs["pred_logits"], targets, indices, outputs["pred_masks"]
            ),
            "loss_mask" + suffix: loss_mask,
            "loss_dice" + suffix: loss_dice,
        }
        return losses, indices

    def forward(
        self, outputs: Dict, targets: Sequence[Dict[str, Tensor]]
    ) -> Tuple[Dict[str, Tensor], Indices]:
        """
        Args:
            outputs: {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w],
                      "aux_outputs": optional list of dicts with the same two keys}.
            targets: B dicts {"labels": long [N], "masks": [N, H, W]} (masks cover the same padded
                image extent as the predictions).

        Returns:
            (weighted losses by name, the final layer's matching: B pairs (query_idx, gt_idx)).
        """
        logits = outputs["pred_logits"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"SetCriterion: {logits.shape[0]} predictions, {len(targets)} targets")
        num_masks = self.num_masks(targets, logits.device)
        losses, indices = self.layer_losses(outputs, targets, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            if f"loss_ce_{i}" not in self.weight_dict:
                raise ValueError(f"SetCriterion: built for fewer than {i + 1} intermediate outputs")
            losses.update(self.layer_losses(aux, targets, num_masks, suffix=f"_{i}")[0])
        return {k: v * self.weight_dict[k] for k, v in losses.items()}, indices
