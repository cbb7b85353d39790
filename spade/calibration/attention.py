"""Cross-attention map capture and per-role aggregation.

Shape shorthand: B batch (prompts), L context tokens, R map side (CALIBRATION.MAP_RESOLUTION),
hh x ww the spatial size of one attention layer, n_heads attention heads.

:class:`CrossAttentionRecorder` is diffusers' :class:`AttnProcessor` with one addition: it hands
the softmax probabilities ``[B * n_heads, hh * ww, L]`` of its layer to an :class:`AttentionStore`,
which averages them over heads, resizes them to ``R x R`` and accumulates one running sum per
token: ``[B, L, R, R]``. Only the ``attn2`` (cross-attention) processors are replaced, by name,
through ``unet.set_attn_processor``; the context manager :func:`capture_cross_attention` restores
the original processors on exit, so nothing is left installed (no cost) when capture is off.
Gradients flow through the recorded maps when the UNet runs with grad (the student).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

__all__ = [
    "AttentionStore",
    "CrossAttentionRecorder",
    "capture_cross_attention",
    "cross_attention_layer_names",
    "role_token_spans",
    "role_maps",
    "normalize_maps",
]

ROLES = ("subject", "predicate", "object")


class AttentionStore:
    """Running sum of cross-attention maps over layers and calls.

    Args:
        resolution: R, side of the stored maps.
        latent_hw: (h, w) of the UNet input latent; each layer's token grid is derived from it.
    """

    def __init__(self, resolution: int, latent_hw: Sequence[int]):
        if resolution < 1:
            raise ValueError(f"CALIBRATION.MAP_RESOLUTION must be >= 1, got {resolution}")
        self.resolution = int(resolution)
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.active = True
        self.reset()

    def reset(self) -> None:
        self.sum: Optional[torch.Tensor] = None  # [B, L, R, R]
        self.num_maps = 0  # number of recorded layer calls
        self.calls: Dict[str, int] = {}  # layer name -> recorded calls

    def _grid(self, num_queries: int) -> tuple:
        h, w = self.latent_hw
        factor = math.sqrt(h * w / num_queries)
        hh, ww = round(h / factor), round(w / factor)
        if hh * ww != num_queries:
            raise ValueError(
                f"cannot map {num_queries} attention queries onto latent {h}x{w}: "
                "expected a downsampled grid of the latent"
            )
        return hh, ww

    def layer_maps(self, probs: torch.Tensor, batch: int) -> torch.Tensor:
        """One layer's probabilities ``[B * n_heads, hh * ww, L]`` as maps ``[B, L, hh, ww]`` on
        the layer's own grid, averaged over heads."""
        heads = probs.shape[0] // batch
        hh, ww = self._grid(probs.shape[1])
        maps = probs.reshape(batch, heads, hh, ww, probs.shape[2]).mean(dim=1)
        return maps.permute(0, 3, 1, 2)

    def record(self, name: str, probs: torch.Tensor, batch: int) -> None:
        """Add one layer's probabilities ``[B * n_heads, hh * ww, L]``."""
        if not self.active:
            return
        maps = self.layer_maps(probs, batch)  # [B, L, hh, ww]
        hh, ww = maps.shape[-2:]
        if (hh, ww) != (self.resolution, self.resolution):
            maps = F.interpolate(
                maps, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False
            )
        self.sum = maps if self.sum is None else self.sum + maps
        self.num_maps += 1
        self.calls[name] = self.calls.get(name, 0) + 1

    def mean(self) -> torch.Tensor:
        """[B, L, R, R]: mean over every recorded layer call (heads already averaged)."""
        if self.sum is None:
            raise RuntimeError("no cross-attention map was recorded (is capture active?)")
        return self.sum / self.num_maps


class CrossAttentionRecorder(AttnProcessor):
    """diffusers' AttnProcessor that also records its attention probabilities in a store."""

    def __init__(self, store: AttentionStore, name: str):
        super().__init__()
        self.store = store
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        # Same computation as AttnProcessor, with the probabilities kept: the library's forward
        # runs unchanged on a view of ``attn`` whose get_attention_scores also records them (a
        # view, not a patched module, so that torch.compile can trace it).
        store, name, batch = self.store, self.name, hidden_states.shape[0]
        return super().__call__(
            _RecordingAttention(attn, lambda probs: store.record(name, probs, batch)),
            hidden_states,
            encoder_hidden_states,
            attention_mask,
            temb,
            *args,
            **kwargs,
        )


class _RecordingAttention:
    """``attn`` as AttnProcessor sees it, with ``get_attention_scores`` also passing the
    probabilities to ``record``; every other attribute is ``attn``'s own."""

    def __init__(self, attn, record):
        self._attn = attn
        self._record = record

    def __getattr__(self, name: str):
        return getattr(self._attn, name)

    def get_attention_scores(self, query, key, attention_mask=None):
        probs = self._attn.get_attention_scores(query, key, attention_mask)
        self._record(probs)
        return probs


def cross_attention_layer_names(unet) -> List[str]:
    """Processor names of every ``attn2`` layer (``...transformer_blocks.0.attn2.processor``)."""
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


@contextlib.contextmanager
def capture_cross_attention(unet, store: AttentionStore) -> Iterator[AttentionStore]:
    """Install :class:`CrossAttentionRecorder` on every ``attn2`` of ``unet`` (``attn1`` keeps
    its processor) and restore the original processors on exit."""
    original = dict(unet.attn_processors)
    names = cross_attention_layer_names(unet)
    if not names:
        raise ValueError("the UNet has no cross-attention (attn2) layers to capture")
    processors = {
        n: (CrossAttentionRecorder(store, n) if n in names else p) for n, p in original.items()
    }
    unet.set_attn_processor(processors)
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


def role_token_spans(
    encode: Callable[[str], List[int]],
    template: str,
    names: Dict[str, str],
    offset: int = 1,
    max_length: Optional[int] = None,
) -> Dict[str, List[int]]:
    """Token positions of each role's words in the prompt made from ``template``.

    Args:
        encode: text -> BPE ids without start / end tokens (e.g. open_clip's ``encode``).
        template: with ``{subject}``, ``{predicate}``, ``{object}`` placeholders.
        names: role -> name (a name may be several words / tokens).
        offset: position of the first text token in the context (1 after a start token).
        max_length: context length; a span reaching past ``max_length - 1`` (the end token)
            raises ValueError.

    Returns:
        role -> list of context positions (consecutive).
    """
    for role in ROLES:
        if "{" + role + "}" not in template:
            raise ValueError(f"CALIBRATION.PROMPT_TEMPLATE {template!r} lacks {{{role}}}")
    full = encode(template.format(**names))
    spans = {}
    for role in ROLES:
        start_pos = template.index("{" + role + "}")
        head = template[:start_pos].format(**names)
        head_ids = encode(head.rstrip()) if head.strip() else []
        upto_ids = encode((head + names[role]).rstrip())
        if full[: len(upto_ids)] != upto_ids or upto_ids[: len(head_ids)] != head_ids:
            raise ValueError(
                f"tokenizer merges {names[role]!r} with its neighbours in prompt "
                f"{template.format(**names)!r}; cannot locate its tokens"
            )
        if len(upto_ids) == len(head_ids):
            raise ValueError(f"role {role} name {names[role]!r} encodes to no tokens")
        span = list(range(offset + len(head_ids), offset + len(upto_ids)))
        if max_length is not None and span[-1] >= max_length - 1:
            raise ValueError(
                f"prompt {template.format(**names)!r} is too long for {max_length} tokens"
            )
        spans[role] = span
    return spans


def role_maps(token_maps: torch.Tensor, spans: Sequence[Dict[str, List[int]]]) -> torch.Tensor:
    """Average each role's token maps.

    Args:
        token_maps: [B, L, R, R] per-token maps of B prompts.
        spans: B dicts role -> positions (from :func:`role_token_spans`).

    Returns:
        [B, 3, R, R] maps of (subject, predicate, object).
    """
    if token_maps.shape[0] != len(spans):
        raise ValueError(f"{token_maps.shape[0]} map sets but {len(spans)} span dicts")
    out = []
    for b, span in enumerate(spans):
        out.append(torch.stack([token_maps[b, span[r]].mean(dim=0) for r in ROLES]))
    return torch.stack(out) if out else token_maps.new_zeros(0, 3, *token_maps.shape[2:])


def normalize_maps(maps: torch.Tensor, mode: str, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``[..., R, R]`` maps: "max" (peak 1), "sum" (spatial sum 1) or "none"."""
    if mode == "none":
        return maps
    flat = maps.flatten(-2)
    if mode == "max":
        denom = flat.amax(dim=-1, keepdim=True)
    elif mode == "sum":
        denom = flat.sum(dim=-1, keepdim=True)
    else:
        raise ValueError(f"CALIBRATION.MAP_NORMALIZATION must be max/sum/none, got {mode!r}")
    return (flat / (denom + eps)).reshape(maps.shape)
