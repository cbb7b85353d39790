"""CLIP gates: does the tiny CLIP know SynthPSG's vocabulary the way stage 2 uses it?

* ``segments_*_top1``: each ground-truth segment of a val image classified over all 14 object
  names by its mask-pooled dense CLIP features (``clip_dense_features`` + ``mask_pool``: stage 2's
  CLIP branch) against template-ensembled text embeddings (``TextEmbeddingBank`` with stage 2's
  default templates); things and stuff reported apart. ``crops_*_top1``: the same with the
  segment's masked crop (outside pixels grey) through the image tower, for comparison.
* ``stage2_naming_by_class`` (no target): per class, ``[hits, count, most frequent wrong name]``
  named the way the SynthPSG stage 2 names it (things: context crops, stuff: pooled segments), which
  tells a class, such as an open-vocabulary novel one, that CLIP does not name.
* ``colour_shape_top1``: a square crop around each val thing vs the 56 prompts "a {colour} {shape}".
* ``retrieval_i2t_r1``: image -> text R@1 among held-out corpus images and their scene captions.
* ``name_max_cosine`` (no target): the largest cosine between the template-ensembled text
  embeddings of two different object names (``name_closest_pair`` names them): stage 2's cosine
  classifier cannot separate two classes whose embeddings coincide (near 1).
* ``token_neighbours`` / ``token_things_nearest_stuff`` (no target): the text tower's per-token
  states, which condition the UNet as CLIP's condition SD 1.5's, for each name in the teacher's
  subject slot ("{name} is left of circle") and object slot ("circle is left of {name}"): each
  name's nearest other name by cosine after removing the mean over the names, and how many thing
  names have a stuff name as their nearest. A thing name among the stuff names gets its
  cross-attention on stuff (MODEL_ZOO.md: diamond and hexagon).
* ``left_right_acc`` / ``above_below_acc`` (no target): a crop around a (subject, object) pair with
  a spatial predicate, "the {s} is left of the {o}" vs "... right of ..." (and above / below):
  the paper's premise is that a VLM is weak here.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from spade.data.synthpsg import PALETTE, PREDICATE_CLASSES, THING_CLASSES, render_scene
from spade.modeling.backbone.diffusion_backbone import clip_dense_features
from spade.modeling.backbone.loading import clip_preprocess, encode_text_tokens, load_clip_folder
from spade.modeling.open_vocab import TextEmbeddingBank, mask_pool, prompt_name

from .captions import scene_caption
from .corpus import CORPUS_SEED_OFFSET, SceneText
from .gates import CLASS_NAMES, GATE_TARGETS, ValImage

__all__ = ["clip_gates", "name_separation"]

_STAGE2_TEMPLATES = ["a photo of a {}.", "a {} in the scene.", "there is a {}."]
# side of the context crop around a segment's box, in box sides: the SynthPSG configs'
# MODEL.SPADE.OPEN_VOCAB.CLIP_CROP_SCALE (the same square crop, min side 16 px at 128 px)
CONTEXT_CROP_SCALE = 1.6


def _to_unit(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()[None] / 255.0


@torch.no_grad()
def _encode_images(clip, crops: List[np.ndarray]) -> torch.Tensor:
    x = torch.cat([clip_preprocess(_to_unit(c), clip) for c in crops])
    return F.normalize(clip.model.encode_image(x), dim=-1)


@torch.no_grad()
def _encode_texts(clip, texts: List[str]) -> torch.Tensor:
    return F.normalize(clip.model.encode_text(clip.tokenizer(texts)), dim=-1)


def _square_crop(rgb: np.ndarray, box, margin: float = 1.6) -> np.ndarray:
    x0, y0, x1, y1 = box
    size = rgb.shape[0]
    side = min(size, max(16, int(np.ceil(margin * max(x1 - x0, y1 - y0)))))
    left = int(np.clip(round((x0 + x1) / 2 - side / 2), 0, size - side))
    top = int(np.clip(round((y0 + y1) / 2 - side / 2), 0, size - side))
    return rgb[top : top + side, left : left + side]


def naming_by_class(named: Dict[str, List[str]]) -> Dict[str, List]:
    """Per true class (sorted): ``[hits, count, most frequent wrong name or None]`` from the
    names given to its segments (a tie goes to the name given first)."""
    out = {}
    for name in sorted(named):
        given = named[name]
        wrong = [g for g in given if g != name]
        common = max(wrong, key=lambda g: (wrong.count(g), -wrong.index(g))) if wrong else None
        out[name] = [len(given) - len(wrong), len(given), common]
    return out


def _segment_accuracy(clip, images: List[ValImage]) -> Dict:
    """Ground-truth segments named among all class names, three ways: dense features pooled under
    the mask (stage 2's CLIP branch), masked crops, and context crops (the unmasked square crop of
    CONTEXT_CROP_SCALE x the segment's box that stage 2 classifies with OPEN_VOCAB.CLIP_CROP_SCALE
    - the SynthPSG configs score things that way)."""
    bank = TextEmbeddingBank(clip, _STAGE2_TEMPLATES)
    text = bank.get([n for n in CLASS_NAMES])
    n_things = len(THING_CLASSES)
    hits = {"things": [], "stuff": []}
    crop_hits = {"things": [], "stuff": []}
    context_hits = {"things": [], "stuff": []}
    named = {}  # class -> names given, the way stage 2 names it (things: context crops)
    for im in images:
        x = clip_preprocess(_to_unit(im.rgb), clip)
        dense = clip_dense_features(clip, x)  # [1, D, g, g]
        masks = torch.from_numpy(im.masks).float()[None]
        pooled = F.normalize(mask_pool(dense, masks)[0], dim=-1)
        pred = (pooled @ text.t()).argmax(dim=-1).tolist()
        crops = []
        for s, m in enumerate(im.masks):
            masked = np.where(m[..., None], im.rgb, 128).astype(np.uint8)
            crops.append(_square_crop(masked, im.boxes[s], margin=1.1))
        crop_pred = (_encode_images(clip, crops) @ text.t()).argmax(dim=-1).tolist()
        context = [_square_crop(im.rgb, box, margin=CONTEXT_CROP_SCALE) for box in im.boxes]
        context_pred = (_encode_images(clip, context) @ text.t()).argmax(dim=-1).tolist()
        for s, cat in enumerate(im.categories):
            kind = "things" if cat < n_things else "stuff"
            hits[kind].append(pred[s] == cat)
            crop_hits[kind].append(crop_pred[s] == cat)
            context_hits[kind].append(context_pred[s] == cat)
            given = context_pred[s] if kind == "things" else pred[s]
            named.setdefault(CLASS_NAMES[cat], []).append(CLASS_NAMES[given])
    out = {"clip/stage2_naming_by_class": naming_by_class(named)}
    for kind in ("things", "stuff"):
        out[f"clip/segments_{kind}_top1"] = round(float(np.mean(hits[kind])), 4)
        out[f"clip/crops_{kind}_top1"] = round(float(np.mean(crop_hits[kind])), 4)
        out[f"clip/context_crops_{kind}_top1"] = round(float(np.mean(context_hits[kind])), 4)
        out[f"clip/segments_{kind}_count"] = len(hits[kind])
    return out


def _colour_shape_accuracy(clip, images: List[ValImage]) -> Dict:
    prompts = [(c, s) for c in PALETTE for s in THING_CLASSES]
    text = _encode_texts(clip, [f"a {c} {s}" for c, s in prompts])
    hits = []
    for im in images:
        things = [k for k, cat in enumerate(im.categories) if cat < len(THING_CLASSES)]
        if not things:
            continue
        crops = [_square_crop(im.rgb, im.boxes[k]) for k in things]
        pred = (_encode_images(clip, crops) @ text.t()).argmax(dim=-1).tolist()
        for k, p in zip(things, pred):
            hits.append(prompts[p] == (im.colours[k], THING_CLASSES[im.categories[k]]))
    return {
        "clip/colour_shape_top1": round(float(np.mean(hits)), 4),
        "clip/colour_shape_count": len(hits),
    }


def _retrieval(clip, cfg) -> Dict:
    c = cfg.PRETRAIN.CORPUS
    n = int(cfg.PRETRAIN.GATES.RETRIEVAL_CAPTIONS)
    first = int(c.NUM_IMAGES)  # held-out indices follow the training images
    crops, texts = [], []
    for i in range(first, first + n):
        scene = render_scene(
            CORPUS_SEED_OFFSET + int(c.SEED),
            i,
            size=int(c.IMAGE_SIZE),
            num_things=tuple(c.NUM_THINGS),
        )
        rng = np.random.default_rng([int(c.SEED), i, 0])
        crops.append(scene.rgb)
        texts.append(
            scene_caption(SceneText.from_scene(scene), rng, kind="scene", synonym_prob=0.0)
        )
    sim = _encode_images(clip, crops) @ _encode_texts(clip, texts).t()
    r1 = (sim.argmax(dim=1) == torch.arange(n)).float().mean()
    return {"clip/retrieval_i2t_r1": round(float(r1), 4), "clip/retrieval_pool": n}


def _spatial_probe(clip, images: List[ValImage]) -> Dict:
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    results = {"left_right": [], "above_below": []}
    for im in images:
        for s, o, p in im.relations:
            name = PREDICATE_CLASSES[p]
            if name not in opposite or max(s, o) >= len(im.colours):
                continue
            boxes = np.array([im.boxes[s], im.boxes[o]])
            union = [boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()]
            crop = _square_crop(im.rgb, union, margin=1.2)
            desc = [f"{im.colours[k]} {THING_CLASSES[im.categories[k]]}" for k in (s, o)]
            texts = [f"the {desc[0]} is {q} the {desc[1]}" for q in (name, opposite[name])]
            sim = (_encode_images(clip, [crop]) @ _encode_texts(clip, texts).t())[0]
            key = "left_right" if name in ("left of", "right of") else "above_below"
            results[key].append(bool(sim[0] > sim[1]))
    return {
        f"clip/{k}_acc": round(float(np.mean(v)), 4) if v else None for k, v in results.items()
    } | {f"clip/{k}_count": len(v) for k, v in results.items()}


def name_separation(encode_texts, names: List[str], templates: List[str]) -> Dict:
    """The closest two of ``names``: each name's embedding is the normalised mean of
    ``encode_texts`` (texts -> [N, D] unit rows) over ``templates``."""
    emb = torch.stack(
        [F.normalize(encode_texts([t.format(n) for t in templates]).mean(0), dim=-1) for n in names]
    )
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    i, j = divmod(int(sim.argmax()), len(names))
    return {
        "clip/name_max_cosine": round(float(sim[i, j]), 4),
        "clip/name_closest_pair": [names[i], names[j]],
    }


TOKEN_SLOTS = {"subject": "{} is left of circle", "object": "circle is left of {}"}


def token_state_neighbours(
    encode_states,
    encode_ids,
    names: List[str],
    num_things: int,
    slots: Optional[Dict[str, str]] = None,
) -> Dict:
    """Nearest neighbours among ``names`` of their per-token text states (module doc).

    Args:
        encode_states: prompts -> [N, L, W] per-token states (position 0 the start token), e.g.
            :func:`~spade.modeling.backbone.loading.encode_text_tokens`.
        encode_ids: text -> BPE ids without start / end tokens (locates each name's tokens).
        names: the class names as written in prompts; the first ``num_things`` are things.
        slots: slot -> prompt template with one ``{}`` (default :data:`TOKEN_SLOTS`).
    Returns:
        ``clip/token_neighbours``: slot -> name -> [nearest name, cosine];
        ``clip/token_things_nearest_stuff``: slot -> number of thing names whose nearest is stuff.
    """
    from .gates_unet import _word_span

    neighbours, among_stuff = {}, {}
    for slot, template in (slots or TOKEN_SLOTS).items():
        head = template[: template.index("{}")].strip()
        states = encode_states([template.format(n) for n in names]).float()
        emb = torch.stack(
            [states[i, _word_span(encode_ids, head, n)].mean(0) for i, n in enumerate(names)]
        )
        emb = F.normalize(emb - emb.mean(0, keepdim=True), dim=-1)
        sim = emb @ emb.T
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1).tolist()
        neighbours[slot] = {
            n: [names[j], round(float(sim[i, j]), 4)]
            for i, (n, j) in enumerate(zip(names, nearest))
        }
        among_stuff[slot] = sum(j >= num_things for j in nearest[:num_things])
    return {"clip/token_neighbours": neighbours, "clip/token_things_nearest_stuff": among_stuff}


def clip_gates(cfg, folder: str, images: List[ValImage]) -> Dict:
    """Every CLIP gate on the exported open_clip folder ``folder``."""
    clip = load_clip_folder(folder)
    out = {}
    out.update(_segment_accuracy(clip, images))
    out.update(_colour_shape_accuracy(clip, images))
    out.update(_retrieval(clip, cfg))
    out.update(_spatial_probe(clip, images))
    out.update(name_separation(lambda t: _encode_texts(clip, t), CLASS_NAMES, _STAGE2_TEMPLATES))
    out.update(
        token_state_neighbours(
            lambda texts: encode_text_tokens(clip, texts),
            clip.tokenizer.encode,
            [prompt_name(n) for n in CLASS_NAMES],
            len(THING_CLASSES),
        )
    )
    out["targets"] = {k: v for k, v in GATE_TARGETS.items() if k.startswith("clip/")}
    return out
