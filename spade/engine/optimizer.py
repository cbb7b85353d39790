"""The optimizer of both SPADE stages (and any model with frozen pretrained parts).

Parameter groups:
- frozen parameters (``requires_grad=False``: UNet, VAE, CLIP) are left out entirely;
- parameters under ``backbone.`` get ``BASE_LR * SOLVER.BACKBONE_MULTIPLIER``;
- normalisation layers get ``SOLVER.WEIGHT_DECAY_NORM``; embeddings (``nn.Embedding`` and free
  learned vectors named ``*embed``/``*embedding``/``*query``, e.g. the background text
  embedding) get ``SOLVER.WEIGHT_DECAY_EMBED``.

Gradient clipping follows ``SOLVER.CLIP_GRADIENTS``: ``full_model`` clips the global norm over all
trainable parameters (as Mask2Former-style trainers do); ``value`` / ``norm`` use detectron2's
per-parameter clippers.
"""

import logging
from typing import Any, Dict, List, Type

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

__all__ = ["build_spade_optimizer", "spade_param_groups"]

_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm2d,
    nn.LocalResponseNorm,
)

logger = logging.getLogger(__name__)


# free learned vectors named like these are embeddings (e.g. the background text embedding)
_EMBED_SUFFIXES = ("embed", "embedding", "embeddings", "query", "queries")


def spade_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_embed: float,
    backbone_multiplier: float,
) -> List[Dict[str, Any]]:
    """One param group per trainable parameter, with its lr and weight decay (see module doc)."""
    groups: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{name}" if module_name else name
            lr = base_lr
            if full_name.startswith("backbone.") or ".backbone." in full_name:
                lr = base_lr * backbone_multiplier
            wd = weight_decay
            if isinstance(module, _NORM_TYPES):
                wd = weight_decay_norm
            elif isinstance(module, nn.Embedding) or name.endswith(_EMBED_SUFFIXES):
                wd = weight_decay_embed
            groups.append({"params": [param], "lr": lr, "weight_decay": wd, "name": full_name})
    return groups


def _with_full_model_clipping(optim_cls: Type[torch.optim.Optimizer], max_norm: float, norm_type):
    class FullModelGradientClipping(optim_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = f"{optim_cls.__name__}WithFullModelGradientClipping"
    return FullModelGradientClipping


def build_spade_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """Build AdamW (or SGD) over the trainable parameters of ``model`` as the module doc says."""
    solver = cfg.SOLVER
    groups = spade_param_groups(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        weight_decay_embed=solver.WEIGHT_DECAY_EMBED,
        backbone_multiplier=solver.BACKBONE_MULTIPLIER,
    )
    if not groups:
        raise ValueError("build_spade_optimizer: the model has no trainable parameters")
    num = sum(p.numel() for g in groups for p in g["params"])
    logger.info(f"Trainable parameters: {num} in {sum(len(g['params']) for g in groups)} tensors")
    name = solver.OPTIMIZER.upper()
    if name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {"lr": solver.BASE_LR}
    elif name == "SGD":
        optim_cls = torch.optim.SGD
        kwargs = {"lr": solver.BASE_LR, "momentum": solver.MOMENTUM, "nesterov": solver.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {solver.OPTIMIZER!r}")
    clip = solver.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = _with_full_model_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
        return optim_cls(groups, **kwargs)
    return maybe_add_gradient_clipping(cfg, optim_cls)(groups, **kwargs)
