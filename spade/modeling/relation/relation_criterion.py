"""Relation targets from the panoptic matcher, L_rel and L_rqc.

Shape shorthand: B batch, Q object queries, R ground-truth triplets of an image, M relation pairs of
an image (the selected top-M plus any ground-truth pair not among them), P predicates of the
training vocabulary (column P = no-relation).

* Targets: a GT triplet (s, o, p) is a target for the query pair (query matched to instance s,
  query matched to instance o). A triplet whose subject or object instance is unmatched is dropped.
* L_rel: soft-label cross-entropy over the P + 1 classes. A pair with k >= 1 GT predicates has the
  target distribution 1/k on each of them (PSG pairs may carry several predicates); any other pair
  has the target "no relation". Rows are averaged with weight ``no_relation_weight`` for no-relation
  rows and 1 otherwise.
* L_rqc: a listwise ranking loss on the pair-selection logits s[i, j] (self pairs excluded): for
  every GT pair g, ``-log(exp(s_g) / (exp(s_g) + sum_{non-GT pairs n} exp(s_n)))``, averaged over
  GT pairs. It is lower the higher GT pairs rank above all other pairs, which is what the top-M
  selection needs.
"""

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "relation_targets",
    "add_target_pairs",
    "matched_pairs",
    "predicate_targets",
    "relation_loss",
    "rqc_loss",
    "RelationCriterion",
]


def relation_targets(
    gt_relations: Tensor,
    query_idx: Tensor,
    gt_idx: Tensor,
    num_predicates: int,
    image_index: int = 0,
) -> Tuple[Tensor, Tensor]:
    """Map GT triplets in instance indices to query pairs through the matcher's assignment.

    Args:
        gt_relations: long [R, 3] (subject instance, object instance, predicate).
        query_idx, gt_idx: long [N'] the matcher's assignment
            (query query_idx[n] <-> instance gt_idx[n]).
        num_predicates: P, size of the training predicate vocabulary.
        image_index: position of the image in the batch (for error messages).
    Returns:
        pairs long [R', 2] (subject query, object query) and predicates long [R'].
    Raises:
        ValueError: malformed gt_relations, or a predicate outside the training vocabulary (e.g. a
            novel predicate of an open-vocabulary split that reached the loss).
    """
    device = query_idx.device
    gt_relations = torch.as_tensor(gt_relations, dtype=torch.long, device=device)
    if gt_relations.numel() == 0:
        gt_relations = gt_relations.reshape(0, 3)
    if gt_relations.dim() != 2 or gt_relations.shape[1] != 3:
        raise ValueError(
            f"targets[{image_index}]['gt_relations'] must be [R, 3], "
            f"got {tuple(gt_relations.shape)}"
        )
    if (gt_relations < 0).any():
        raise ValueError(f"targets[{image_index}]['gt_relations'] holds negative indices")
    bad = gt_relations[:, 2] >= num_predicates
    if bad.any():
        raise ValueError(
            f"targets[{image_index}]['gt_relations'] has predicate index "
            f"{int(gt_relations[bad, 2][0])} outside the training predicate vocabulary of size "
            f"{num_predicates} (novel predicates must be filtered out before the loss)"
        )
    all_idx = torch.cat([gt_idx.long().flatten(), gt_relations[:, :2].flatten()])
    num_instances = int(all_idx.max()) + 1 if all_idx.numel() else 0
    instance_to_query = torch.full((num_instances,), -1, dtype=torch.long, device=device)
    instance_to_query[gt_idx.long()] = query_idx.long()
    subj = instance_to_query[gt_relations[:, 0]]
    obj = instance_to_query[gt_relations[:, 1]]
    keep = (subj >= 0) & (obj >= 0)
    return torch.stack([subj[keep], obj[keep]], dim=1), gt_relations[keep, 2]


def add_target_pairs(selected: Tensor, target_pairs: Tensor, num_queries: int) -> Tensor:
    """Union of selected pairs [M, 2] and GT pairs [R', 2]: selected first, then missing GT ones."""
    if len(target_pairs) == 0:
        return selected
    key_sel = selected[:, 0] * num_queries + selected[:, 1]
    key_gt = torch.unique(target_pairs[:, 0] * num_queries + target_pairs[:, 1])
    missing = key_gt[~torch.isin(key_gt, key_sel)]
    extra = torch.stack([missing // num_queries, missing % num_queries], dim=1)
    return torch.cat([selected, extra], dim=0)


def matched_pairs(query_idx: Tensor) -> Tensor:
    """Every ordered pair (i, j), i != j, of the matched queries ``query_idx`` [N']: long
    [N'(N'-1), 2], row-major in the order of ``query_idx``."""
    q = query_idx.long().flatten()
    n = len(q)
    if n < 2:
        return torch.zeros(0, 2, dtype=torch.long, device=q.device)
    grid = torch.stack(torch.meshgrid(q, q, indexing="ij"), dim=-1).reshape(-1, 2)
    return grid[~torch.eye(n, dtype=torch.bool, device=q.device).flatten()]


def predicate_targets(
    pairs: Tensor, target_pairs: Tensor, target_predicates: Tensor, num_predicates: int
) -> Tensor:
    """Soft targets [M, P + 1] for ``pairs`` [M, 2]: 1/k on each of a pair's k GT predicates, else
    one-hot on the no-relation column P. Duplicate GT triplets count once."""
    M = len(pairs)
    targets = torch.zeros(M, num_predicates + 1, device=pairs.device)
    if M == 0:
        return targets
    Q = int(torch.cat([pairs.flatten(), target_pairs.flatten()]).max()) + 1
    if len(target_pairs):
        pair_key = pairs[:, 0] * Q + pairs[:, 1]
        gt_key = target_pairs[:, 0] * Q + target_pairs[:, 1]
        hit = pair_key[:, None] == gt_key[None, :]  # [M, R']
        row, col = hit.nonzero(as_tuple=True)
        targets[row, target_predicates[col]] = 1.0
    positive = targets.sum(dim=1) > 0
    targets[positive] /= targets[positive].sum(dim=1, keepdim=True)
    targets[~positive, num_predicates] = 1.0
    return targets


def relation_loss(logits: Tensor, targets: Tensor, no_relation_weight: float) -> Tensor:
    """Weighted soft cross-entropy: logits, targets [M, P + 1] -> scalar (0 with grad if M = 0)."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}")
    if len(logits) == 0:
        return logits.sum() * 0.0
    per_row = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    negative = targets[:, -1] > 0.5
    weight = torch.where(
        negative, torch.full_like(per_row, no_relation_weight), torch.ones_like(per_row)
    )
    return (per_row * weight).sum() / weight.sum().clamp(min=1e-6)


def rqc_loss(selection_logits: Tensor, positive_pairs: Tensor) -> Tuple[Tensor, int]:
    """Listwise L_rqc of one image.

    Args:
        selection_logits: [Q, Q] pair-selection logits s[i, j] (diagonal ignored).
        positive_pairs: long [R', 2] GT (subject query, object query) pairs.
    Returns:
        (sum of the per-positive losses, number of distinct positives). Zero with grad when none.
    """
    Q = selection_logits.shape[0]
    positive = torch.zeros(Q, Q, dtype=torch.bool, device=selection_logits.device)
    if len(positive_pairs):
        positive[positive_pairs[:, 0], positive_pairs[:, 1]] = True
    eye = torch.eye(Q, dtype=torch.bool, device=selection_logits.device)
    positive &= ~eye
    n_pos = int(positive.sum())
    if n_pos == 0:
        return selection_logits.sum() * 0.0, 0
    s = selection_logits.float()
    negatives = s.masked_fill(positive | eye, float("-inf")).flatten()
    neg_lse = torch.logsumexp(negatives, dim=0)  # -inf when there is no negative pair
    pos = s[positive]
    # -log(e^p / (e^p + e^N)) = softplus(N - p)
    return F.softplus(neg_lse - pos).sum(), n_pos


class RelationCriterion(nn.Module):
    """REL_WEIGHT * L_rel + RQC_WEIGHT * L_rqc over a batch (panoptic losses live elsewhere)."""

    def __init__(
        self,
        *,
        rel_weight: float,
        rqc_weight: float,
        no_relation_weight: float,
        use_rqc_loss: bool,
    ):
        """Weights come from ``MODEL.SPADE.RELATION`` (REL_WEIGHT, RQC_WEIGHT = lambda_rqc,
        NO_RELATION_WEIGHT, USE_RQC_LOSS), where their defaults live."""
        super().__init__()
        self.rel_weight = rel_weight
        self.rqc_weight = rqc_weight
        self.no_relation_weight = no_relation_weight
        self.use_rqc_loss = use_rqc_loss

    def forward(
        self,
        predicate_logits: Sequence[Tensor],
        predicate_target_rows: Sequence[Tensor],
        selection_logits: Tensor,
        positive_pairs: List[Tensor],
    ) -> Dict[str, Tensor]:
        """
        Args:
            predicate_logits: per image [M_i, P + 1].
            predicate_target_rows: per image [M_i, P + 1] soft targets (:func:`predicate_targets`).
            selection_logits: [B, Q, Q] pair-selection logits.
            positive_pairs: per image long [R'_i, 2] GT query pairs.
        Returns:
            {"loss_rel": scalar, "loss_rqc": scalar (only when L_rqc is on)}, weights applied.
        """
        logits = torch.cat(list(predicate_logits), dim=0)
        targets = torch.cat(list(predicate_target_rows), dim=0)
        losses = {
            "loss_rel": self.rel_weight * relation_loss(logits, targets, self.no_relation_weight)
        }
        if self.use_rqc_loss:
            total = selection_logits.sum() * 0.0
            count = 0
            for b, pairs in enumerate(positive_pairs):
                loss_b, n_b = rqc_loss(selection_logits[b], pairs)
                total = total + loss_b
                count += n_b
            losses["loss_rqc"] = self.rqc_weight * total / max(count, 1)
        return losses
