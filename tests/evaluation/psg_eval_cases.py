"""Hand-made PSG-style cases for the evaluator tests: image A, model outputs, and the
``make_dataset`` fixture (import it into a test module to use it).

Image "A" (10 x 30, width 30 -> distant when centres are > 10 px apart):
  id 1 "circle" (thing 0): columns 0-4   -> centre x 2.0
  id 2 "square" (thing 1): columns 5-9   -> centre x 7.0   (5 px from id 1: near)
  id 3 "sky"    (stuff 2): columns 20-29 -> centre x 24.5  (22.5 px from id 1: distant)
relations: (1 on 2), (1 above 3), (2 left of 1) in segment indices (0, 1, 0), (0, 2, 1), (1, 0, 2).
"""

import itertools
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from panopticapi.utils import id2rgb
from PIL import Image

THINGS = ["circle", "square"]
STUFF = ["sky"]
PREDICATES = ["on", "above", "left of"]
_counter = itertools.count()


def seg_a() -> np.ndarray:
    seg = np.zeros((10, 30), dtype=np.int64)
    seg[:, 0:5] = 1
    seg[:, 5:10] = 2
    seg[:, 20:30] = 3
    return seg


IMAGE_A = {
    "seg": seg_a(),
    "segments": [(1, 0), (2, 1), (3, 2)],
    "relations": [[0, 1, 0], [0, 2, 1], [1, 0, 2]],
}


def make_output(seg, segments, triplets, num_predicates=len(PREDICATES), pair_scores=None):
    """A model output (docs/INTERFACES.md): triplets [(subject id, object id, predicate)] ranked.

    Row t scores 1 - 0.01 t; its predicate_scores row puts that score on its predicate and 0.001
    on the others.
    """
    t = len(triplets)
    scores = (
        torch.tensor([1.0 - 0.01 * i for i in range(t)]) if pair_scores is None else pair_scores
    )
    pscores = torch.full((t, num_predicates), 0.001)
    trip = torch.tensor(triplets, dtype=torch.long).reshape(-1, 3)
    if t:
        pscores[torch.arange(t), trip[:, 2]] = scores
    return {
        "panoptic_seg": (
            torch.as_tensor(seg, dtype=torch.int32),
            [
                {"id": sid, "category_id": cat, "isthing": cat < len(THINGS), "score": 1.0}
                for sid, cat in segments
            ],
        ),
        "relations": {"triplets": trip, "scores": scores, "predicate_scores": pscores},
    }


def _write_png(seg: np.ndarray, path: str) -> None:
    Image.fromarray(id2rgb(seg.astype(np.int64))).save(path)


@pytest.fixture
def make_dataset(tmp_path):
    """make_dataset(images, predicates=PREDICATES, **meta) -> (name, dataset dicts).

    images: list of {"seg", "segments": [(id, category)], "relations", optional "image_id"}.
    """

    def make(images, predicates=PREDICATES, **meta):
        name = f"eval_test_{next(_counter)}_{os.getpid()}"
        dicts = []
        for i, im in enumerate(images):
            image_id = str(im.get("image_id", f"img{i}"))
            png = str(tmp_path / f"{name}_{image_id}.png")
            _write_png(im["seg"], png)
            h, w = im["seg"].shape
            segs = []
            for sid, cat in im["segments"]:
                ys, xs = np.nonzero(im["seg"] == sid)
                box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
                segs.append(
                    {
                        "id": sid,
                        "category_id": cat,
                        "iscrowd": 0,
                        "isthing": cat < len(THINGS),
                        "area": int(len(xs)),
                        "bbox": box,
                    }
                )
            dicts.append(
                {
                    "file_name": png,
                    "height": h,
                    "width": w,
                    "image_id": image_id,
                    "pan_seg_file_name": png,
                    "segments_info": segs,
                    "relations": [list(r) for r in im["relations"]],
                }
            )
        DatasetCatalog.register(name, lambda d=dicts: d)
        MetadataCatalog.get(name).set(
            thing_classes=THINGS,
            stuff_classes=STUFF,
            predicate_classes=list(predicates),
            evaluator_type="psg",
            **meta,
        )
        return name, dicts

    return make
