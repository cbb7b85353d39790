"""Token grounding for the tiny UNet: an auxiliary loss that ties a noun's cross-attention to its
segment, as TokenCompose (Wang et al., CVPR 2024) fine-tunes Stable Diffusion with masks from a
grounded segmenter.

Why the miniature world needs it: SD 1.5's word maps localise after billions of image-text pairs;
the tiny UNet sees about 10^5 on the CPU, and its maps for shape words stay nearly flat (see
MODEL_ZOO.md). The corpus knows every segment (:meth:`Corpus.segments`), so each noun of a caption
(a shape or stuff name, or one of its synonyms) can be given the mask of every segment of its class.

For a noun n with context positions P and the mask M of its class, at each recorded cross-attention
layer (heads averaged, ``A[p]`` the softmax probability of position p at each query pixel)::

    a = sum_{p in P} A[p]                      # [hh, ww]
    inside = sum(a * pool(M)) / sum(a)         # share of the noun's attention on its class
    loss_token = (1 - inside) ** 2             # TokenCompose's token loss

averaged over nouns and layers (``pool`` is the area share of M in each cell of the layer's grid).
It only moves where a noun's attention goes over the image, not how much of it the noun takes from
the other tokens, so the SD-style conditioning is unchanged.

TokenCompose's second term, the pixel loss (:func:`grounding_pixel_loss`), is a per-pixel binary
cross-entropy between ``a`` (a probability: the softmax runs over the context at each pixel) and
``pool(M)``::

    loss_pixel = mean_x BCE(a(x), pool(M)(x))

averaged over nouns and layers (with ``PRETRAIN.UNET.GROUNDING_PIXEL_PHRASE`` the sum runs over
the whole noun phrase, the colour and size words right before the noun included: see
:func:`noun_spans`). Unlike the token loss it also asks the noun to take the attention
*inside* its segment and to leave it everywhere else, so a noun whose attention is spread over its
segment but peaks on a neighbour (a stuff word on the things standing on it) is told where its
peak belongs.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from spade.data.synthpsg import PALETTE

from .captions import SHAPE_SYNONYMS, STUFF_SYNONYMS

__all__ = [
    "NOUN_PHRASES",
    "MODIFIER_WORDS",
    "noun_spans",
    "grounding_targets",
    "LayerMapStore",
    "grounding_losses",
    "grounding_loss",
    "grounding_pixel_loss",
]


def _noun_table() -> Dict[Tuple[str, ...], str]:
    table = {}
    for synonyms in (SHAPE_SYNONYMS, STUFF_SYNONYMS):
        for name, others in synonyms.items():
            for phrase in (name, *others):
                table[tuple(phrase.split())] = name
    return table


NOUN_PHRASES: Dict[Tuple[str, ...], str] = _noun_table()  # words -> class name
_LONGEST = max(len(k) for k in NOUN_PHRASES)
# words a caption puts right before a noun ("a small red circle"): size and colour
MODIFIER_WORDS = frozenset(("small", "large", *PALETTE))


def noun_spans(
    caption: str,
    encode: Callable[[str], List[int]],
    context_length: int = 77,
    with_modifiers: bool = False,
) -> List[Tuple[str, List[int]]]:
    """(class name, context positions) of every noun phrase of ``caption``, in caption order.

    Args:
        caption: a corpus caption (lower case, words separated by spaces; "," and "." may end a
            word).
        encode: text -> BPE ids without start / end tokens (open_clip's ``tokenizer.encode``).
        context_length: the text tower's context; position 0 is the start token, and a noun whose
            tokens reach the end token's last possible slot (truncated captions) is left out.
        with_modifiers: the positions also cover the size and colour words
            (:data:`MODIFIER_WORDS`) right before the noun ("small red" of "a small red circle"),
            as long as no punctuation separates them from it.

    The tokenizer splits text at spaces before its BPE, so the tokens of the first ``k`` words
    are those of the caption's first ``k`` words on their own; positions come from prefix lengths.
    """
    words = caption.split()
    bare = [w.strip(".,").lower() for w in words]
    out, i = [], 0
    while i < len(words):
        for n in range(min(_LONGEST, len(words) - i), 0, -1):
            name = NOUN_PHRASES.get(tuple(bare[i : i + n]))
            # a phrase cannot run past punctuation that ends one of its inner words
            if name is None or any(w.lower() != b for w, b in zip(words[i : i + n - 1], bare[i:])):
                continue
            first = i
            while (
                with_modifiers
                and first > 0
                and bare[first - 1] in MODIFIER_WORDS
                and words[first - 1].lower() == bare[first - 1]
            ):
                first -= 1
            head = " ".join(words[:first])
            start = len(encode(head)) if head else 0
            stop = len(encode(" ".join(words[:i] + bare[i : i + n])))
            if stop + 1 <= context_length - 1:  # +1 for the start token; the end token follows
                out.append((name, list(range(1 + start, 1 + stop))))
            i += n
            break
        else:
            i += 1
    return out


def grounding_targets(
    caption: str,
    masks: np.ndarray,
    names: Sequence[str],
    encode: Callable[[str], List[int]],
    where: str = "",
    pixel_phrase: bool = False,
) -> List[Tuple]:
    """(context positions, float [H, W] mask of the noun's class) for each noun of ``caption``;
    with ``pixel_phrase`` a third item, the positions of the whole noun phrase (size and colour
    words included, :func:`noun_spans` ``with_modifiers``), which the pixel loss then sums.

    Args:
        masks: bool [S, H, W] segments of the captioned image; ``names`` their S class names.
        where: names the image in errors (a caption naming a class the image lacks is an error,
            never a silently empty target).
    """
    spans = noun_spans(caption, encode)
    phrases = noun_spans(caption, encode, with_modifiers=True) if pixel_phrase else spans
    out = []
    for (name, positions), (_, phrase) in zip(spans, phrases):
        sel = [k for k, n in enumerate(names) if n == name]
        if not sel:
            raise ValueError(
                f"{where}: caption {caption!r} names {name!r}, which no segment of the image has "
                f"(segments: {sorted(set(names))})"
            )
        mask = masks[sel].any(0).astype(np.float32)
        out.append((positions, mask, phrase) if pixel_phrase else (positions, mask))
    return out


class LayerMapStore:
    """Keeps each cross-attention call's maps ``[B, L, hh, ww]`` (heads averaged, at the layer's own
    grid, with grad); a store for :func:`spade.calibration.attention.capture_cross_attention`."""

    def __init__(self, latent_hw: Sequence[int]):
        from spade.calibration.attention import AttentionStore

        self._layer_maps = AttentionStore(1, latent_hw).layer_maps
        self.maps: List[torch.Tensor] = []

    def record(self, name: str, probs: torch.Tensor, batch: int) -> None:
        self.maps.append(self._layer_maps(probs, batch))


def _noun_layer_maps(layer_maps, targets):
    """Per recorded layer, ``(a, a_pixel, pooled)``: each noun's summed attention probabilities
    ``[E, hh, ww]`` over its positions and over the positions its pixel loss reads (a target's
    optional third item, else the same), and its class mask's area share per cell
    ``[E, hh, ww]``; ``None`` when no sample of the batch has a noun."""
    if not layer_maps:
        raise ValueError("grounding losses need at least one recorded cross-attention layer")
    ref = layer_maps[0]
    rows = [(b, item) for b, items in enumerate(targets) for item in items]
    if not rows:
        return None
    length = ref.shape[1]
    select = torch.zeros(len(rows), length, dtype=ref.dtype, device=ref.device)
    select_pixel = torch.zeros_like(select)
    for r, (_, item) in enumerate(rows):
        select[r, item[0]] = 1.0
        select_pixel[r, item[2] if len(item) > 2 else item[0]] = 1.0
    same = torch.equal(select, select_pixel)
    sample = torch.tensor([b for b, _ in rows], device=ref.device)
    masks = torch.from_numpy(np.stack([item[1] for _, item in rows])).to(ref)[:, None]  # [E,1,H,W]
    pooled: Dict[Tuple[int, int], torch.Tensor] = {}
    out = []
    for maps in layer_maps:
        hh, ww = maps.shape[-2:]
        if (hh, ww) not in pooled:
            pooled[(hh, ww)] = F.adaptive_avg_pool2d(masks, (hh, ww))[:, 0]
        per_noun = maps[sample].to(ref.dtype)
        attn = torch.einsum("el,elhw->ehw", select, per_noun)
        attn_pixel = attn if same else torch.einsum("el,elhw->ehw", select_pixel, per_noun)
        out.append((attn, attn_pixel, pooled[(hh, ww)]))
    return out


def grounding_losses(
    layer_maps: Sequence[torch.Tensor], targets: Sequence[Sequence[Tuple[List[int], np.ndarray]]]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(token loss, pixel loss) of the module doc, each a mean over the nouns of the batch and the
    layers, from one pass over the layers.

    Args:
        layer_maps: per recorded layer call, ``[B, L, hh, ww]`` attention probabilities.
        targets: per sample, its :func:`grounding_targets` (empty for a dropped caption).
    Returns:
        two scalars; both 0 (still attached to the maps) when no sample has a noun.
    """
    per_layer = _noun_layer_maps(layer_maps, targets)
    if per_layer is None:
        zero = sum(m.sum() for m in layer_maps) * 0.0
        return zero, zero
    token, pixel = [], []
    for attn, attn_pixel, pooled in per_layer:
        inside = (attn * pooled).flatten(1).sum(1) / attn.flatten(1).sum(1).clamp_min(1e-12)
        token.append(((1.0 - inside) ** 2).mean())
        # a sum of softmax probabilities: within [0, 1]
        a = attn_pixel.float().clamp(1e-6, 1.0 - 1e-6)
        pixel.append(F.binary_cross_entropy(a, pooled.float()))
    return torch.stack(token).mean(), torch.stack(pixel).mean()


def grounding_loss(
    layer_maps: Sequence[torch.Tensor], targets: Sequence[Sequence[Tuple[List[int], np.ndarray]]]
) -> torch.Tensor:
    """TokenCompose's token loss alone (:func:`grounding_losses`' first term)."""
    return grounding_losses(layer_maps, targets)[0]


def grounding_pixel_loss(
    layer_maps: Sequence[torch.Tensor], targets: Sequence[Sequence[Tuple[List[int], np.ndarray]]]
) -> torch.Tensor:
    """TokenCompose's pixel loss alone (:func:`grounding_losses`' second term): BCE of each
    noun's attention probability against its class mask's area share, mean over pixels, nouns
    and layers."""
    return grounding_losses(layer_maps, targets)[1]
