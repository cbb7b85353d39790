"""Class / predicate vocabularies of a SPADE model, read from dataset metadata or given by name."""

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

from detectron2.data import MetadataCatalog

__all__ = ["Vocabulary", "vocabulary_from_metadata", "base_vocabulary"]


@dataclass(frozen=True)
class Vocabulary:
    """Object classes (things first is not required), their thing flags, predicates and novel flags.

    ``class_names``: K names; ``is_thing``: K bools; ``predicate_names``: P names;
    ``novel_classes``: K bools, True for classes unseen in training (weight ``beta`` in fusion).
    ``source_class_ids`` / ``source_predicate_ids``: for a vocabulary that is a subset of its
    dataset's (the base classes of an open-vocabulary split), the dataset id of each entry; empty
    means the identity. Training targets are remapped through them (:meth:`label_lookup`).
    """

    class_names: Tuple[str, ...]
    is_thing: Tuple[bool, ...]
    predicate_names: Tuple[str, ...] = ()
    novel_classes: Tuple[bool, ...] = field(default=())
    source_class_ids: Tuple[int, ...] = field(default=())
    source_predicate_ids: Tuple[int, ...] = field(default=())

    def label_lookup(self, kind: str) -> Optional[Tuple[int, ...]]:
        """Dataset id -> vocabulary index (-1: not in this vocabulary), or None for the identity.

        ``kind`` is "class" or "predicate"."""
        ids = self.source_class_ids if kind == "class" else self.source_predicate_ids
        if not ids:
            return None
        lut = [-1] * (max(ids) + 1)
        for index, source in enumerate(ids):
            lut[source] = index
        return tuple(lut)

    def __post_init__(self):
        if len(self.class_names) == 0:
            raise ValueError("Vocabulary: no class names")
        if len(self.is_thing) != len(self.class_names):
            raise ValueError(
                f"Vocabulary: {len(self.is_thing)} thing flags for {len(self.class_names)} classes"
            )
        if self.novel_classes and len(self.novel_classes) != len(self.class_names):
            raise ValueError(
                f"Vocabulary: {len(self.novel_classes)} novel flags for "
                f"{len(self.class_names)} classes"
            )
        if not self.novel_classes:
            object.__setattr__(self, "novel_classes", (False,) * len(self.class_names))


def vocabulary_from_metadata(
    dataset_name: str,
    class_names: Optional[Sequence[str]] = None,
    predicate_names: Optional[Sequence[str]] = None,
    seen_class_names: Optional[Sequence[str]] = None,
) -> Vocabulary:
    """Vocabulary of a registered dataset (thing + stuff classes, ``predicate_classes``).

    Non-empty ``class_names`` / ``predicate_names`` override the dataset's; an override's class is a
    thing unless the dataset lists it among its stuff classes. A class is novel when the dataset's
    ``ov_split`` names it among ``novel_objects`` or when ``seen_class_names`` is given and
    lacks it.
    """
    meta = MetadataCatalog.get(dataset_name)
    things = list(meta.get("thing_classes", []) or [])
    stuff = list(meta.get("stuff_classes", []) or [])
    if not class_names and not things and not stuff:
        raise ValueError(
            f"dataset {dataset_name!r}: metadata has no thing_classes / stuff_classes "
            "(is the dataset "
            "registered?) and no class names were given"
        )
    names = list(class_names) if class_names else things + stuff
    if class_names:
        stuff_set = set(stuff)
        flags = [n not in stuff_set for n in names]
    else:
        flags = [True] * len(things) + [False] * len(stuff)
    predicates = (
        list(predicate_names) if predicate_names else list(meta.get("predicate_classes", []) or [])
    )
    novel = set((meta.get("ov_split", None) or {}).get("novel_objects", []))
    seen = set(seen_class_names) if seen_class_names is not None else None
    novel_flags = [n in novel or (seen is not None and n not in seen) for n in names]
    return Vocabulary(tuple(names), tuple(flags), tuple(predicates), tuple(novel_flags))


def base_vocabulary(vocab: Vocabulary, ov_split: Optional[dict]) -> Vocabulary:
    """The training vocabulary of an open-vocabulary split: ``vocab`` without the novel classes
    and predicates (so they never reach a training loss, not even as negatives), with the dataset
    ids of the kept entries. Without a split, ``vocab`` itself."""
    if not ov_split:
        return vocab
    novel_objects = set(ov_split.get("novel_objects", []))
    novel_predicates = set(ov_split.get("novel_predicates", []))
    keep = [i for i, n in enumerate(vocab.class_names) if n not in novel_objects]
    keep_p = [i for i, n in enumerate(vocab.predicate_names) if n not in novel_predicates]
    return Vocabulary(
        tuple(vocab.class_names[i] for i in keep),
        tuple(vocab.is_thing[i] for i in keep),
        tuple(vocab.predicate_names[i] for i in keep_p),
        (False,) * len(keep),
        tuple(keep),
        tuple(keep_p),
    )
