"""The caption corpus: the miniature world's "web data" for pretraining the tiny CLIP, VAE and UNet.

Images are SynthPSG scenes (:func:`spade.data.synthpsg.render_scene`) drawn from generator seeds
that no SynthPSG dataset uses: the corpus of ``PRETRAIN.CORPUS.SEED = s`` renders scene ``i`` as
``render_scene(CORPUS_SEED_OFFSET + s, i, num_things=(1, 8))``, and the datasets use
``DATASETS.SYNTHPSG.SEED`` (0 by default) directly, so the two never share an image as long as
dataset seeds stay below ``CORPUS_SEED_OFFSET`` (checked by :func:`check_disjoint`). The corpus
covers every shape class (open-vocabulary novel ones included), every stuff class, every palette
colour and 1 to 8 things per image.

On disk (``PRETRAIN.CORPUS.ROOT``), built once and reused, shard by shard so an interrupted build
resumes: ``shard_KKKK.npy`` (uint8 [n, S, S, 3], read through a memory map, never held whole in
memory) + ``shard_KKKK.jsonl`` (one :class:`SceneText` per line: what captions need), then
``manifest.json`` written last. Captions are not stored: caption ``v`` of image ``i`` is drawn from
``numpy.random.default_rng([seed, i, v])``, so each visit of an image may see another caption and
the same (i, v) always gives the same text.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from spade.data.synthpsg import THING_CLASSES, render_scene
from spade.utils.io import atomic_write, atomic_write_bytes, atomic_write_json

from .captions import describe_thing, scene_caption, shape_negatives

__all__ = [
    "CORPUS_SEED_OFFSET",
    "CorpusSpec",
    "SceneText",
    "Corpus",
    "build_corpus",
    "build_corpus_parallel",
    "check_disjoint",
]

logger = logging.getLogger(__name__)

CORPUS_SEED_OFFSET = 1_000_000
CROP_TEMPLATES = ("a photo of {}.", "a picture of {}.", "{}.", "this is {}.")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CorpusSpec:
    """What a corpus is: the manifest of a built one."""

    seed: int
    num_images: int
    image_size: int = 128
    shard_size: int = 2000
    min_things: int = 1
    max_things: int = 8
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_cfg(cls, cfg) -> "CorpusSpec":
        c = cfg.PRETRAIN.CORPUS
        return cls(
            seed=int(c.SEED),
            num_images=int(c.NUM_IMAGES),
            image_size=int(c.IMAGE_SIZE),
            shard_size=int(c.SHARD_SIZE),
            min_things=int(c.NUM_THINGS[0]),
            max_things=int(c.NUM_THINGS[1]),
        )

    @property
    def num_shards(self) -> int:
        return (self.num_images + self.shard_size - 1) // self.shard_size


@dataclass
class SceneText:
    """The caption-relevant facts of one scene (no pixels): duck-types Scene for the captioner."""

    thing_classes: List[int]
    thing_colours: List[str]
    thing_radii: List[float]
    thing_boxes: List[List[int]]  # xyxy of each visible thing mask
    stuff_names: List[str]
    candidates: List[Tuple[int, int, int]]
    image_size: int

    @classmethod
    def from_scene(cls, scene) -> "SceneText":
        boxes = []
        for m in scene.thing_masks:
            ys, xs = np.nonzero(m)
            boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
        return cls(
            thing_classes=[int(c) for c in scene.thing_classes],
            thing_colours=list(scene.thing_colours),
            thing_radii=[round(float(r), 3) for r in scene.thing_radii],
            thing_boxes=boxes,
            stuff_names=list(scene.stuff_names),
            candidates=[tuple(int(v) for v in c) for c in scene.candidates],
            image_size=int(scene.image_size),
        )

    @classmethod
    def from_json(cls, line: str) -> "SceneText":
        d = json.loads(line)
        d["candidates"] = [tuple(c) for c in d["candidates"]]
        return cls(**d)


def check_disjoint(corpus_seed: int, dataset_seeds: Sequence[int]) -> None:
    """Raise ValueError when a SynthPSG dataset seed could reach the corpus's generator seeds."""
    for s in dataset_seeds:
        if int(s) >= CORPUS_SEED_OFFSET:
            raise ValueError(
                f"DATASETS.SYNTHPSG.SEED={s} is >= {CORPUS_SEED_OFFSET}, the range reserved for "
                "the "
                f"caption corpus (PRETRAIN.CORPUS.SEED={corpus_seed} renders with generator seed "
                f"{CORPUS_SEED_OFFSET + corpus_seed}); choose a smaller dataset seed"
            )


def _shard_paths(root: str, k: int) -> Tuple[str, str]:
    return os.path.join(root, f"shard_{k:04d}.npy"), os.path.join(root, f"shard_{k:04d}.jsonl")


def _render(spec: CorpusSpec, i: int):
    """The scene of corpus image ``i`` (deterministic from the spec's seed)."""
    return render_scene(
        CORPUS_SEED_OFFSET + spec.seed,
        int(i),
        size=spec.image_size,
        num_things=(spec.min_things, spec.max_things),
    )


def _build_shard(root: str, spec: CorpusSpec, k: int) -> None:
    npy, jsonl = _shard_paths(root, k)
    start = k * spec.shard_size
    stop = min(spec.num_images, start + spec.shard_size)
    images = np.zeros((stop - start, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    lines = []
    for i in range(start, stop):
        scene = _render(spec, i)
        images[i - start] = scene.rgb
        lines.append(json.dumps(asdict(SceneText.from_scene(scene))))
    atomic_write_bytes(jsonl, ("\n".join(lines) + "\n").encode())

    def write_images(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, images)

    atomic_write(npy, write_images)


def build_corpus(root: str, spec: CorpusSpec, rank: int = 0, world_size: int = 1) -> str:
    """Build (or finish building) the corpus of ``spec`` in ``root``; returns ``root``.

    Shards are independent, so ``world_size`` processes can build them in parallel (each takes
    shards ``rank::world_size``); the manifest is written by whoever finds all shards complete.
    A folder holding a corpus of another spec is an error, never overwritten.
    """
    from tqdm import tqdm

    os.makedirs(root, exist_ok=True)
    manifest_path = os.path.join(root, "manifest.json")
    if os.path.isfile(manifest_path):
        found = _read_json(manifest_path)
        if found != asdict(spec):
            raise ValueError(
                f"{manifest_path} describes another corpus ({found}) than PRETRAIN.CORPUS asks "
                f"for ({asdict(spec)}); remove {root} or set PRETRAIN.CORPUS.ROOT elsewhere"
            )
        return root
    todo = [
        k
        for k in range(rank, spec.num_shards, world_size)
        if not all(os.path.isfile(p) for p in _shard_paths(root, k))
    ]
    for k in tqdm(todo, desc=f"caption corpus shards ({root})", disable=rank != 0 or not todo):
        _build_shard(root, spec, k)
    if all(os.path.isfile(p) for k in range(spec.num_shards) for p in _shard_paths(root, k)):
        atomic_write_json(manifest_path, asdict(spec))
    return root


def _build_part(args) -> None:
    root, spec, rank, world_size = args
    build_corpus(root, spec, rank, world_size)


def build_corpus_parallel(root: str, spec: CorpusSpec, processes: int) -> str:
    """:func:`build_corpus` with ``processes`` worker processes (shards split by rank)."""
    if int(processes) <= 1:
        return build_corpus(root, spec)
    import multiprocessing as mp

    os.makedirs(root, exist_ok=True)
    with mp.get_context("fork").Pool(int(processes)) as pool:
        pool.map(_build_part, [(root, spec, r, int(processes)) for r in range(int(processes))])
    return build_corpus(root, spec)  # checks every shard, writes the manifest


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


class Corpus:
    """Read access to a built corpus: images (memory-mapped), scene facts and captions.

    Args:
        root: the corpus folder (must hold ``manifest.json``).
        synonym_prob: probability of a synonym for each name in a caption.
    """

    def __init__(self, root: str, synonym_prob: float = 0.15):
        manifest = os.path.join(root, "manifest.json")
        if not os.path.isfile(manifest):
            raise FileNotFoundError(
                f"{root} holds no complete caption corpus (no manifest.json); build it with "
                "build_corpus / projects/SPADE/pretrain_net.py"
            )
        self.spec = CorpusSpec(**_read_json(manifest))
        self.root = root
        self.synonym_prob = float(synonym_prob)
        self._images: List[Optional[np.ndarray]] = [None] * self.spec.num_shards
        self._texts: List[Optional[List[SceneText]]] = [None] * self.spec.num_shards

    def __len__(self) -> int:
        return self.spec.num_images

    def _locate(self, i: int) -> Tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"corpus image {i} out of range [0, {len(self)})")
        return divmod(int(i), self.spec.shard_size)

    def image(self, i: int) -> np.ndarray:
        """uint8 [S, S, 3] of corpus image ``i``."""
        k, j = self._locate(i)
        if self._images[k] is None:
            self._images[k] = np.load(_shard_paths(self.root, k)[0], mmap_mode="r")
        return np.asarray(self._images[k][j])

    def scene(self, i: int) -> SceneText:
        k, j = self._locate(i)
        if self._texts[k] is None:
            with open(_shard_paths(self.root, k)[1]) as f:
                self._texts[k] = [SceneText.from_json(line) for line in f if line.strip()]
        return self._texts[k][j]

    def caption(self, i: int, variant: int = 0, kind: str = "") -> str:
        """Caption ``variant`` of image ``i`` (deterministic; see module doc)."""
        rng = np.random.default_rng([self.spec.seed, int(i), int(variant)])
        scene = self.scene(i)
        if not kind and len(scene.thing_classes) == 1 and rng.random() < 0.5:
            kind = "single"
        return scene_caption(scene, rng, kind=kind, synonym_prob=self.synonym_prob)

    def thing_crop(
        self, i: int, variant: int, margin: float = 1.6, negatives: int = 0
    ) -> Tuple[np.ndarray, str, Tuple[int, int, int, int], List[str]]:
        """A square crop around one thing of image ``i``, its one-thing caption and ``negatives``
        hard-negative captions.

        The thing is chosen by (i, variant); the crop side is ``margin`` times the larger side
        of its box (clipped to the image). Colour and size are left out of the caption 40 % of
        the time (so shape names are learned on their own), and 30 % of captions sit in a
        template ("a photo of a red star."). The negatives are the same caption with another
        shape's name (:func:`~spade.pretrain.captions.shape_negatives`).
        Returns (uint8 crop, caption, xyxy box of the crop, negative captions).
        """
        variant_seed = (self.spec.seed, int(i), int(variant), 1)
        rng = np.random.default_rng(variant_seed)
        scene = self.scene(i)
        k = int(rng.integers(0, len(scene.thing_classes)))
        x0, y0, x1, y1 = scene.thing_boxes[k]
        side = int(np.ceil(margin * max(x1 - x0, y1 - y0)))
        side = min(max(side, 16), scene.image_size)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left = int(np.clip(round(cx - side / 2), 0, scene.image_size - side))
        top = int(np.clip(round(cy - side / 2), 0, scene.image_size - side))
        crop = self.image(i)[top : top + side, left : left + side]
        caption = describe_thing(
            scene, k, np.random.default_rng([*variant_seed, 0]), self.synonym_prob, colour_drop=0.4
        )
        negs = (
            shape_negatives(scene, k, variant_seed, self.synonym_prob, negatives, colour_drop=0.4)
            if negatives
            else []
        )
        t = np.random.default_rng([*variant_seed, 3])
        if t.random() < 0.3:
            template = CROP_TEMPLATES[int(t.integers(0, len(CROP_TEMPLATES)))]
            caption, negs = template.format(caption), [template.format(n) for n in negs]
        return crop, caption, (left, top, left + side, top + side), negs

    def segments(self, i: int) -> Tuple[np.ndarray, List[str]]:
        """Every segment of image ``i``: (bool masks [S, size, size], class names [S]), things in
        drawing order then stuff.

        The corpus stores pixels and caption facts, not masks: the scene is rendered again from
        (seed, i), which reproduces it exactly; a stored image that differs from the rendering is
        an error naming the corpus and the image (masks never come from another picture).
        """
        scene = _render(self.spec, i)
        if not np.array_equal(scene.rgb, self.image(i)):
            raise ValueError(
                f"caption corpus {self.root}: stored image {i} differs from its rendering by "
                f"this code (seed {self.spec.seed}); rebuild the corpus"
            )
        names = [THING_CLASSES[c] for c in scene.thing_classes] + list(scene.stuff_names)
        masks = np.concatenate([scene.thing_masks, scene.stuff_masks]).astype(bool)
        return masks, names

    def iter_indices(
        self, seed: int, rank: int = 0, world_size: int = 1, limit: int = 0
    ) -> Iterator[Tuple[int, int]]:
        """Endless (image index, epoch) stream: a seeded permutation per epoch of the first
        ``limit`` images (0 = all), sharded by rank."""
        n = min(int(limit), len(self)) if limit else len(self)
        epoch = 0
        while True:
            order = np.random.default_rng([seed, epoch]).permutation(n)
            for i in order[rank::world_size]:
                yield int(i), epoch
            epoch += 1
