"""Captions of the miniature world's "web data": words for what a SynthPSG scene shows.

A caption is a pure function of a :class:`~spade.data.synthpsg.Scene` and a numpy generator.
Kinds (drawn per caption, probabilities in :data:`CAPTION_KINDS`):

* ``scene``: every thing with its size and colour, in a random order, then the stuff
  ("a large red circle, a blue star and a small white ring on grass under the sky");
* ``relations``: 1 to 3 true relations between described things ("the red circle is left of
  the blue star"), then the remaining things and the stuff, so every object is still named;
* ``bare``: one true relation in the stage-1 teacher form with bare class names
  ("circle is left of star"), as short alt-texts on the web often are;
* ``single``: one thing alone ("a small yellow cross") — used for crops around one thing and for
  one-thing scenes.

Names go through synonyms with probability ``synonym_prob`` (the canonical name otherwise), so the
text tower meets "disc" and "circle" in the same places. Every predicate of SynthPSG, the novel
ones included, appears in ``relations`` / ``bare`` captions.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from spade.data.synthpsg import PREDICATE_CLASSES, THING_CLASSES, Scene

__all__ = [
    "CAPTION_KINDS",
    "SHAPE_SYNONYMS",
    "STUFF_SYNONYMS",
    "PREDICATE_SYNONYMS",
    "size_word",
    "describe_thing",
    "shape_negatives",
    "scene_caption",
]

CAPTION_KINDS = {"scene": 0.45, "relations": 0.35, "bare": 0.2}
SHAPE_SYNONYMS: Dict[str, Sequence[str]] = {
    "circle": ("disc", "round disc"),
    "square": ("box", "square block"),
    "triangle": ("three-sided shape",),
    "star": ("five-pointed star",),
    "ring": ("hoop", "donut"),
    "cross": ("plus sign",),
    "diamond": ("rhombus",),
    "hexagon": ("six-sided shape",),
}
STUFF_SYNONYMS: Dict[str, Sequence[str]] = {
    "sky": ("clear sky",),
    "wall": ("plain wall",),
    "ground": ("dirt", "soil"),
    "grass": ("lawn",),
    "water": ("lake",),
    "floor": ("wooden floor",),
}
PREDICATE_SYNONYMS: Dict[str, Sequence[str]] = {
    "left of": ("to the left of",),
    "right of": ("to the right of",),
    "above": ("over",),
    "below": ("under", "beneath"),
    "next to": ("beside", "touching"),
    "far from": ("far away from", "distant from"),
    "on": ("resting on", "standing on"),
    "in front of": ("covering", "overlapping"),
    "nearest to": ("closest to",),
    "same colour as": ("the same colour as",),
}
_SKY_LIKE = ("sky", "wall")


def _pick(rng: np.random.Generator, canonical: str, synonyms, prob: float) -> str:
    if synonyms and rng.random() < prob:
        return str(synonyms[int(rng.integers(0, len(synonyms)))])
    return canonical


def size_word(radius: float, image_size: int) -> str:
    """ "small" below 11 % of the width, "large" above 15 %, else "" (radii span 8-18 %)."""
    share = radius / float(image_size)
    return "small" if share < 0.11 else ("large" if share > 0.15 else "")


def describe_thing(
    scene: Scene,
    k: int,
    rng: np.random.Generator,
    synonym_prob: float,
    article: str = "a",
    colour_drop: float = 0.0,
    shape: str = "",
) -> str:
    """ "a large red circle": article, size (when not medium), colour and shape of thing ``k``;
    size and colour are left out with probability ``colour_drop`` ("a circle"). ``shape`` names
    another shape class instead of the thing's own (for hard negatives)."""
    shape = shape or THING_CLASSES[scene.thing_classes[k]]
    plain = colour_drop > 0 and rng.random() < colour_drop
    size = "" if plain else size_word(scene.thing_radii[k], scene.image_size)
    words = [
        article,
        size,
        "" if plain else scene.thing_colours[k],
        _pick(rng, shape, SHAPE_SYNONYMS[shape], synonym_prob),
    ]
    text = " ".join(w for w in words if w)
    if article == "a" and text.split(" ", 2)[1][0] in "aeiou":
        text = "an" + text[1:]
    return text


def shape_negatives(
    scene: Scene,
    k: int,
    variant_seed: Sequence[int],
    synonym_prob: float,
    count: int,
    colour_drop: float = 0.0,
) -> List[str]:
    """``count`` captions of thing ``k`` that are false only in the shape word: each names another
    shape class (distinct ones, drawn from ``variant_seed``) with the size and colour words of the
    true caption drawn from the same generator state ``[*variant_seed, 0]`` (see
    :meth:`Corpus.thing_crop`). A contrastive loss that must rank the true caption above these
    cannot solve crops by colour alone: it has to read the shape word."""
    own = scene.thing_classes[k]
    others = [c for c in range(len(THING_CLASSES)) if c != own]
    picker = np.random.default_rng([*variant_seed, 2])
    picks = picker.choice(len(others), size=min(count, len(others)), replace=False)
    out = []
    for j in picks:
        rng = np.random.default_rng([*variant_seed, 0])  # the true caption's draws
        out.append(
            describe_thing(
                scene,
                k,
                rng,
                synonym_prob,
                colour_drop=colour_drop,
                shape=THING_CLASSES[others[int(j)]],
            )
        )
    return out


def _join(parts: List[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _stuff_phrase(scene: Scene, rng: np.random.Generator, synonym_prob: float) -> str:
    names = [_pick(rng, s, STUFF_SYNONYMS[s], synonym_prob) for s in scene.stuff_names]
    canon = list(scene.stuff_names)
    if not names:
        return ""
    top = [n for n, c in zip(names, canon) if c in _SKY_LIKE]
    low = [n for n, c in zip(names, canon) if c not in _SKY_LIKE]
    form = int(rng.integers(0, 3))
    if top and low:
        if form == 0:
            return f"on {_join(low)} under the {top[0]}"
        if form == 1:
            return f"in front of the {top[0]}, with {_join(low)} below"
        return f"with the {top[0]} above {_join(low)}"
    return f"with {_join(names)} behind"


def _relation_phrase(
    scene: Scene, triplet: Tuple[int, int, int], rng, synonym_prob: float, bare: bool
) -> Tuple[str, List[int]]:
    s, o, p = triplet
    n = len(scene.thing_classes)
    pred = PREDICATE_CLASSES[p]
    pred_text = _pick(rng, pred, PREDICATE_SYNONYMS[pred], synonym_prob)

    def name(i: int) -> str:
        if i >= n:  # stuff
            stuff = scene.stuff_names[i - n]
            return (
                stuff if bare else "the " + _pick(rng, stuff, STUFF_SYNONYMS[stuff], synonym_prob)
            )
        if bare:
            return THING_CLASSES[scene.thing_classes[i]]
        return describe_thing(scene, i, rng, synonym_prob, article="the")

    return f"{name(s)} is {pred_text} {name(o)}", [i for i in (s, o) if i < n]


def scene_caption(
    scene: Scene,
    rng: np.random.Generator,
    kind: str = "",
    synonym_prob: float = 0.15,
    max_relations: int = 3,
) -> str:
    """One caption of ``scene``; ``kind`` "" draws one from :data:`CAPTION_KINDS`.

    A scene without a true relation falls back from ``relations`` / ``bare`` to ``scene``;
    ``single`` needs exactly one thing.
    """
    if not kind:
        kinds = list(CAPTION_KINDS)
        p = np.array([CAPTION_KINDS[k] for k in kinds])
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    n = len(scene.thing_classes)
    if kind in ("relations", "bare") and not scene.candidates:
        kind = "scene"
    if kind == "single":
        if n != 1:
            raise ValueError(f"a 'single' caption needs a one-thing scene, got {n} things")
        return describe_thing(scene, 0, rng, synonym_prob)
    if kind == "bare":
        c = scene.candidates[int(rng.integers(0, len(scene.candidates)))]
        return _relation_phrase(scene, c, rng, synonym_prob, bare=True)[0]
    clauses, named = [], set()
    if kind == "relations":
        count = min(len(scene.candidates), int(rng.integers(1, max_relations + 1)))
        for j in rng.choice(len(scene.candidates), size=count, replace=False):
            text, ids = _relation_phrase(scene, scene.candidates[int(j)], rng, synonym_prob, False)
            clauses.append(text)
            named.update(ids)
    elif kind != "scene":
        raise ValueError(
            f"unknown caption kind {kind!r}; expected one of {list(CAPTION_KINDS)} or single"
        )
    rest = [k for k in rng.permutation(n).tolist() if k not in named]
    things = _join([describe_thing(scene, k, rng, synonym_prob) for k in rest])
    stuff = _stuff_phrase(scene, rng, synonym_prob)
    if things:
        lead = ("", "a picture of ", "there is ")[int(rng.integers(0, 3))] if not clauses else ""
        clauses.append(f"{lead}{things} {stuff}".strip())
    elif stuff:
        clauses.append(stuff)
    return ". ".join(clauses)
