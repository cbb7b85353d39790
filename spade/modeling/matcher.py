"""Hungarian matching of object queries to ground-truth segments.

Shape shorthand: B batch, Q queries, K classes (+1 no-object), N ground-truth segments of an image,
P sampled points, h x w predicted-mask resolution, H x W target-mask resolution.
"""

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

__all__ = ["HungarianMatcher", "assignment_from_cost", "batch_bce_cost", "batch_dice_cost"]


def assignment_from_cost(cost: Tensor) -> Tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment of a [Q, N] cost matrix (Q >= N or Q < N both work).

    Returns (query_idx long [min(Q, N)], gt_idx long [min(Q, N)]), sorted by query index.
    """
    if not torch.isfinite(cost).all():
        raise ValueError("assignment_from_cost: the cost matrix holds NaN or inf values")
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def batch_bce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean point-wise BCE of every prediction against every target.

    logits [Q, P], targets [N, P] in {0, 1}; returns [Q, N].
    """
    num_points = logits.shape[1]
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / num_points


def batch_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """1 - smoothed dice of every prediction against every target: logits [Q, P], targets [N, P]
    -> [Q, N]."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """Assigns each ground-truth segment one query, minimising
    ``cost_class * (-p(class)) + cost_mask * BCE + cost_dice * dice`` on a random point sample
    shared by predictions and targets. Runs under ``no_grad``.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        if num_points < 1:
            raise ValueError(f"HungarianMatcher: num_points must be >= 1, got {num_points}")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    def cost_matrix(
        self, logits: Tensor, mask_logits: Tensor, labels: Tensor, masks: Tensor
    ) -> Tensor:
        """Cost of one image.

        Args:
            logits: [Q, K+1] class logits; mask_logits: [Q, h, w];
            labels: long [N]; masks: [N, H, W] (bool or {0, 1}).

        Returns:
            [Q, N].
        """
        probs = logits.float().softmax(-1)
        cost_class = -probs[:, labels]
        coords = torch.rand(1, self.num_points, 2, device=mask_logits.device)
        tgt = point_sample(
            masks[:, None].float(), coords.expand(masks.shape[0], -1, -1), align_corners=False
        )[:, 0]
        pred = point_sample(
            mask_logits[:, None].float(),
            coords.expand(mask_logits.shape[0], -1, -1),
            align_corners=False,
        )[:, 0]
        return (
            self.cost_mask * batch_bce_cost(pred, tgt)
            + self.cost_class * cost_class
            + self.cost_dice * batch_dice_cost(pred, tgt)
        )

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w]}.
            targets: B dicts {"labels": long [N], "masks": [N, H, W]}.

        Returns:
            B pairs (query_idx long [N], gt_idx long [N]) (fewer when N > Q), on the CPU.
        """
        logits, mask_logits = outputs["pred_logits"], outputs["pred_masks"]
        if len(targets) != logits.shape[0]:
            raise ValueError(
                f"HungarianMatcher: {logits.shape[0]} predictions, {len(targets)} targets"
            )
        num_classes = logits.shape[-1] - 1
        indices = []
        for b, target in enumerate(targets):
            labels, masks = target["labels"], target["masks"]
            if labels.shape[0] != masks.shape[0]:
                raise ValueError(
                    f"HungarianMatcher: image {b}: {labels.shape[0]} labels but "
                    f"{masks.shape[0]} masks"
                )
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.long)
                indices.append((empty, empty.clone()))
                continue
            if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
                raise ValueError(
                    f"HungarianMatcher: image {b}: labels {labels.tolist()} "
                    f"outside [0, {num_classes})"
                )
            cost = self.cost_matrix(logits[b], mask_logits[b], labels, masks)
            indices.append(assignment_from_cost(cost))
        return indices
