"""Open-vocabulary classification with CLIP: text embeddings, cosine classifier, mask pooling,
fusion.

Shape shorthand: B batch, Q object queries, M relation pairs, N vocabulary size (classes or
predicates), D CLIP joint embedding dim, h x w dense CLIP feature map, H x W mask resolution.

Two paths classify each object query (and each relation pair) over a vocabulary of names:
* the *diffusion* path: query embeddings -> :class:`CosineClassifier` against CLIP text embeddings;
* the *CLIP* path: dense CLIP image features pooled under the query's mask (:func:`mask_pool`) or
  under the union of subject and object masks (:func:`joint_mask_pool`), compared with the same
  text embeddings.
They are fused by :func:`geometric_fusion`, P = P_diff^alpha * P_clip^(1 - alpha) (beta replacing
alpha for novel classes). The vocabulary is just a list of names, so it can be replaced at
inference (OPEN_VOCAB.CLASS_NAMES / PREDICATE_NAMES) without retraining.
"""

from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbone.loading import ClipParts, tokenize

__all__ = [
    "TextEmbeddingBank",
    "CosineClassifier",
    "TextWhitening",
    "build_text_banks",
    "prompt_name",
    "mask_pool",
    "square_context_boxes",
    "joint_mask_pool",
    "geometric_fusion",
]

_MAX_LOGIT_SCALE = 4.6052  # log(100), CLIP's clamp of the learned temperature


def prompt_name(name: str) -> str:
    """A dataset class name as words: "wall-other-merged" -> "wall", "dining_table" -> "dining
    table"."""
    words = name.replace("_", " ").split("-")
    words = [w for w in words if w not in ("merged", "other", "stuff")] or words
    return " ".join(" ".join(words).split())


class TextEmbeddingBank:
    """Template-ensembled CLIP text embeddings of a vocabulary, cached per tuple of names.

    ``get(names)`` returns [N, D] L2-normalised embeddings: each name is put into every template,
    encoded by CLIP's text tower, normalised, averaged over templates and normalised again. Results
    are cached per exact tuple of names (an LRU of ``max_entries`` vocabularies); asking for another
    vocabulary computes it, and the least recently used one is dropped when the cache is full.
    ``hits`` / ``misses`` count cache behaviour. Runs without grad; CLIP is frozen.
    """

    def __init__(
        self,
        clip_parts: ClipParts,
        templates: Sequence[str],
        max_entries: int = 4,
        batch_size: int = 256,
    ):
        if not templates:
            raise ValueError("TextEmbeddingBank needs at least one prompt template")
        for t in templates:
            if t.count("{}") != 1:
                raise ValueError(f"prompt template {t!r} must contain exactly one '{{}}'")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.clip = clip_parts
        self.templates = list(templates)
        self.max_entries = int(max_entries)
        self.batch_size = int(batch_size)
        self._cache: "OrderedDict[Tuple[str, ...], torch.Tensor]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, names: Sequence[str]) -> torch.Tensor:
        """names (N) -> [N, D] L2-normalised, template-ensembled embeddings (cached)."""
        if isinstance(names, str):
            raise TypeError("TextEmbeddingBank.get expects a list of names, got a single str")
        key = tuple(str(n) for n in names)
        if not key:
            raise ValueError("TextEmbeddingBank.get: the vocabulary is empty")
        if key in self._cache:
            self.hits += 1
            self._cache.move_to_end(key)
            return self._cache[key]
        self.misses += 1
        embeddings = self._encode(key)
        self._cache[key] = embeddings
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return embeddings

    def clear(self) -> None:
        """Drop every cached vocabulary."""
        self._cache.clear()

    def _encode(self, names: Tuple[str, ...]) -> torch.Tensor:
        prompts = [t.format(prompt_name(n)) for n in names for t in self.templates]
        model = self.clip.model
        chunks = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                tokens = tokenize(self.clip, prompts[start : start + self.batch_size])
                chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
        per_template = torch.cat(chunks).view(len(names), len(self.templates), -1)
        return F.normalize(per_template.mean(dim=1), dim=-1)


def build_text_banks(cfg, clip_parts: ClipParts) -> Tuple[TextEmbeddingBank, TextEmbeddingBank]:
    """(class bank, predicate bank) with OPEN_VOCAB.TEMPLATES / PREDICATE_TEMPLATES."""
    ov = cfg.MODEL.SPADE.OPEN_VOCAB
    return (
        TextEmbeddingBank(clip_parts, list(ov.TEMPLATES)),
        TextEmbeddingBank(clip_parts, list(ov.PREDICATE_TEMPLATES)),
    )


class TextWhitening(nn.Module):
    """Shrunk ZCA whitening of text embeddings, fitted once on a reference (training) vocabulary.

    ``forward(text) = (text - mu) @ W`` with ``mu`` the reference mean and ``W = P S^{-1/2}``,
    ``S = (1 - s) * Cov + s * (tr(Cov) / D) * I`` (``s`` = ``shrinkage``), ``P`` the projection
    onto the span of the centred reference embeddings (the eigenvectors of ``Cov`` with non-zero
    eigenvalues; ``S`` shares them). A small CLIP's text embeddings of related names can be nearly
    collinear (the SynthPSG tiny CLIP: cosine 0.999 between "above" and "below"): a cosine
    classifier against them cannot separate the names however its input is trained. Whitening
    spreads the reference names over the directions in which they differ; any other vocabulary
    (novel names) goes through the same fixed map, so the classifier stays open-vocabulary.
    ``s = 1`` only centres (and projects).

    Why ``P``: N reference names span at most N - 1 of the D directions. In the others ``S`` has
    only its shrinkage term, so ``S^{-1/2}`` alone would scale them up by about
    ``sqrt(D / (s (N - 1)))`` relative to an average reference direction (33x for 7 predicates
    in 64-D at ``s = 0.01``). A novel name's whitened vector would then point almost entirely
    along its own residual outside the span, where the classifier's input was never trained, and
    its cosine with any query would be arbitrary: in the SynthPSG OvR setting one novel predicate
    came out on top for every pair (single-predicate R@50 of the base predicates: 0.0). The
    reference names lie in the span, so ``P`` leaves them, and everything trained on them,
    unchanged; a novel name keeps what it shares with the reference names.

    The statistics are buffers that are not saved with a checkpoint: they are a deterministic
    function of the frozen text tower and the training vocabulary, so the model recomputes them
    at build time (``fit``); using the module before ``fit`` is an error.
    """

    def __init__(self, dim: int, shrinkage: float):
        super().__init__()
        if not 0.0 < shrinkage <= 1.0:
            raise ValueError(f"TextWhitening: shrinkage must be in (0, 1], got {shrinkage}")
        self.dim = int(dim)
        self.shrinkage = float(shrinkage)
        self.register_buffer("mean", torch.zeros(self.dim), persistent=False)
        self.register_buffer("matrix", torch.eye(self.dim), persistent=False)
        self.fitted = False

    @torch.no_grad()
    def fit(self, text: torch.Tensor) -> "TextWhitening":
        """Fit on the reference vocabulary's embeddings text [N, D] (N >= 2)."""
        if text.dim() != 2 or text.shape[1] != self.dim or len(text) < 2:
            raise ValueError(
                f"TextWhitening.fit needs [N >= 2, D={self.dim}] embeddings, "
                f"got {tuple(text.shape)}"
            )
        x = text.double()
        mu = x.mean(dim=0)
        cov = (x - mu).t() @ (x - mu) / len(x)
        scale = torch.trace(cov) / self.dim
        if scale <= 0:
            raise ValueError("TextWhitening.fit: the reference embeddings are all identical")
        values, vectors = torch.linalg.eigh(cov)  # S = (1 - s) Cov + s scale I: same vectors
        shrunk = (1.0 - self.shrinkage) * values.clamp(min=0) + self.shrinkage * scale
        in_span = (values > values.max() * 1e-9).to(x.dtype)  # P: drop the null directions
        matrix = vectors @ torch.diag(shrunk.rsqrt() * in_span) @ vectors.t()
        self.mean.copy_(mu.to(self.mean))
        self.matrix.copy_((matrix * scale.sqrt()).to(self.matrix))  # unit scale for s = 1
        self.fitted = True
        return self

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """text [N, D] -> whitened [N, D] (not normalised)."""
        if not self.fitted:
            raise RuntimeError(
                "TextWhitening used before fit(): the model fits it on the training vocabulary "
                "at build time; a standalone head needs fit(training text embeddings)"
            )
        return (text - self.mean.to(text.dtype)) @ self.matrix.to(text.dtype)


class CosineClassifier(nn.Module):
    """Cosine-similarity classifier against text embeddings, with a learned background embedding.

    logits = exp(logit_scale) * cos(x, [w(text); background]); ``logit_scale`` is learnable
    (initialised to ``logit_scale_init``, clamped at log 100 as in CLIP); ``w`` is the identity,
    or :class:`TextWhitening` when ``text_whitening`` (its shrinkage) is > 0.
    """

    def __init__(self, dim: int, logit_scale_init: float, text_whitening: float = 0.0):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"CosineClassifier: dim must be positive, got {dim}")
        self.dim = int(dim)
        self.background = nn.Parameter(torch.randn(self.dim) * self.dim**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.whitening = TextWhitening(dim, text_whitening) if text_whitening > 0 else None

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x [..., D], text [N, D] -> logits [..., N + 1] (last column: background, no relation)"""
        if x.shape[-1] != self.dim or text.dim() != 2 or text.shape[1] != self.dim:
            raise ValueError(
                f"CosineClassifier(dim={self.dim}): got x {tuple(x.shape)}, "
                f"text {tuple(text.shape)}"
            )
        text = text.to(x.dtype)
        if self.whitening is not None:
            text = self.whitening(text)
        weights = torch.cat([text, self.background.to(x.dtype)[None]], dim=0)
        cosine = F.normalize(x, dim=-1) @ F.normalize(weights, dim=-1).t()
        return self.logit_scale.clamp(max=_MAX_LOGIT_SCALE).exp() * cosine


def mask_pool(
    features: torch.Tensor, masks: torch.Tensor, threshold: Optional[float] = None
) -> torch.Tensor:
    """Average dense features under each mask.

    Args:
        features: [B, D, h, w] dense (CLIP) features.
        masks: [B, Q, H, W] soft masks in [0, 1] (or bool); resized bilinearly to h x w.
        threshold: if given, the resized masks are binarised with ``> threshold``.
    Returns:
        [B, Q, D]: sum(f * m) / sum(m); a mask with no weight on the map pools to zeros.
    """
    if features.dim() != 4 or masks.dim() != 4 or features.shape[0] != masks.shape[0]:
        raise ValueError(
            f"mask_pool expects features [B, D, h, w] and masks [B, Q, H, W], "
            f"got {tuple(features.shape)} and {tuple(masks.shape)}"
        )
    weights = _resize_masks(masks, features.shape[-2:], features.dtype)
    if threshold is not None:
        weights = (weights > threshold).to(features.dtype)
    total = torch.einsum("bqhw,bdhw->bqd", weights, features)
    area = weights.sum(dim=(-2, -1)).unsqueeze(-1)
    return total / area.clamp(min=1e-6)


def joint_mask_pool(
    features: torch.Tensor,
    masks: torch.Tensor,
    pairs: torch.Tensor,
    threshold: Optional[float] = None,
) -> torch.Tensor:
    """Average dense features under the union of each pair's subject and object masks.

    Args:
        features: [B, D, h, w]; masks: [B, Q, H, W] in [0, 1];
        pairs: long [B, M, 2] (subject query, object query) indices into Q.
        threshold: as in :func:`mask_pool`.
    Returns:
        [B, M, D]. The union is max(m_subject, m_object), taken after resizing to h x w.
    """
    if pairs.dim() != 3 or pairs.shape[-1] != 2 or pairs.shape[0] != masks.shape[0]:
        raise ValueError(f"joint_mask_pool expects pairs [B, M, 2], got {tuple(pairs.shape)}")
    q = masks.shape[1]
    if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= q):
        raise ValueError(f"joint_mask_pool: pair indices outside [0, {q})")
    small = _resize_masks(masks, features.shape[-2:], features.dtype)  # [B, Q, h, w]
    index = pairs.long()[..., None, None].expand(-1, -1, -1, *small.shape[-2:])  # [B, M, 2, h, w]
    gathered = torch.gather(small[:, None].expand(-1, pairs.shape[1], -1, -1, -1), 2, index)
    union = gathered.max(dim=2).values  # [B, M, h, w]
    return mask_pool(features, union, threshold)


def geometric_fusion(
    p_diff: torch.Tensor,
    p_clip: torch.Tensor,
    alpha: float,
    beta: float,
    novel_mask: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Geometric-mean fusion of the diffusion-path and CLIP-path class probabilities.

    For class i: f_i = p_diff_i^w_i * p_clip_i^(1 - w_i), w_i = beta if novel_mask[i] else alpha.

    Args:
        p_diff: [..., N + 1] probabilities of the diffusion path, last column = background
            (no object / no relation); or [..., N] without a background column.
        p_clip: [..., N] CLIP-path probabilities over the N classes (CLIP knows no background).
        alpha, beta: weights of the diffusion path for base / novel classes.
        novel_mask: bool [N] (None = every class is base).
        normalize: as FC-CLIP / ODISE apply it, the fused class scores are renormalised to sum to
            1 - p_background (the diffusion path's background probability, kept as is), so the
            output is again a distribution. False returns the raw products (background unchanged).
    Returns:
        fused probabilities with the shape of ``p_diff``.
    """
    n = p_clip.shape[-1]
    if p_diff.shape[-1] == n + 1:
        classes, background = p_diff[..., :-1], p_diff[..., -1:]
    elif p_diff.shape[-1] == n:
        classes, background = p_diff, None
    else:
        raise ValueError(
            f"geometric_fusion: p_diff {tuple(p_diff.shape)} must have N or N + 1 columns for "
            f"p_clip {tuple(p_clip.shape)} with N = {n}"
        )
    weight = torch.full((n,), float(alpha), dtype=classes.dtype, device=classes.device)
    if novel_mask is not None:
        if tuple(novel_mask.shape) != (n,):
            raise ValueError(
                f"geometric_fusion: novel_mask must be [{n}], got {tuple(novel_mask.shape)}"
            )
        weight = torch.where(
            novel_mask.to(weight.device), torch.full_like(weight, float(beta)), weight
        )
    eps = torch.finfo(classes.dtype).tiny
    log_diff = classes.clamp(min=eps).log()
    log_clip = p_clip.to(classes.dtype).clamp(min=eps).log()
    log_fused = weight * log_diff + (1 - weight) * log_clip
    if not normalize:
        fused = log_fused.exp()
        return fused if background is None else torch.cat([fused, background], dim=-1)
    fused = log_fused.softmax(dim=-1)
    if background is None:
        return fused
    return torch.cat([fused * (1 - background), background], dim=-1)


def _resize_masks(masks: torch.Tensor, size, dtype: torch.dtype) -> torch.Tensor:
    masks = masks.to(dtype)
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    if masks.numel() == 0:  # no queries / pairs: interpolate rejects empty tensors
        return masks.new_zeros(*masks.shape[:-2], *size)
    return F.interpolate(masks, size=tuple(size), mode="bilinear", align_corners=False)


def square_context_boxes(
    boxes: torch.Tensor, scale: float, height: int, width: int
) -> torch.Tensor:
    """Square boxes around ``boxes`` [..., 4] (xyxy pixels) for region crops: side ``scale`` x the
    box's longer side (at least 1/8 and at most the image's shorter side), centred on the box and
    shifted to lie inside the image. A degenerate (empty) box becomes the centred largest square.
    """
    limit = float(min(height, width))
    wh = boxes[..., 2:] - boxes[..., :2]
    empty = wh.min(dim=-1).values <= 0
    side = (scale * wh.max(dim=-1).values).clamp(min=limit / 8, max=limit)
    side = torch.where(empty, torch.full_like(side, limit), side)
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    image_centre = torch.tensor([width / 2, height / 2], device=boxes.device, dtype=boxes.dtype)
    centre = torch.where(empty[..., None], image_centre.expand_as(centre), centre)
    half = side[..., None] / 2
    high = torch.tensor([width, height], device=boxes.device, dtype=boxes.dtype)
    low_corner = torch.minimum((centre - half).clamp(min=0), high - side[..., None])
    return torch.cat([low_corner, low_corner + side[..., None]], dim=-1)
