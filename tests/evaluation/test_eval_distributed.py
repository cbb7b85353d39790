"""PSGEvaluator under detectron2.engine.launch with two CPU (GLOO) workers."""

import json

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import launch
from detectron2.utils import comm
from psg_eval_cases import (
    IMAGE_A,
    make_dataset,  # noqa: F401 (pytest fixture)
    make_output,
    seg_a,
)

from spade.engine.launch import exit_worker
from spade.evaluation.psg_evaluation import PSGEvaluator

OUTPUTS = {
    "img0": [(1, 2, 0), (1, 3, 1), (2, 1, 2)],  # all 3 right
    "b": [(1, 2, 0)],  # 1 of 3
    "c": [(2, 1, 2), (1, 3, 0)],  # 1 of 3
    "d": [],  # no rows: skipped
}


def _worker(name, dicts, meta, result_path):
    """Each rank registers the dataset, scores every other image; rank 0 writes the results."""
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(**meta)
    ev = PSGEvaluator(name, protocol="both")
    ev.reset()
    for d in dicts[comm.get_rank() :: comm.get_world_size()]:
        out = make_output(seg_a(), IMAGE_A["segments"], OUTPUTS[d["image_id"]])
        ev.process([{"image_id": d["image_id"]}], [out])
    results = ev.evaluate()
    if comm.is_main_process():
        with open(result_path, "w") as f:
            json.dump(results, f)
    else:
        assert results == {}
    exit_worker()


def test_two_workers_gather_to_main(make_dataset, tmp_path):
    images = [dict(IMAGE_A, image_id=i) for i in OUTPUTS]
    name, dicts = make_dataset(images)
    meta = {k: v for k, v in MetadataCatalog.get(name).as_dict().items() if k != "name"}
    path = tmp_path / "results.json"
    launch(_worker, 2, dist_url="auto", args=(name, dicts, meta, str(path)))
    res = json.load(open(path))
    assert res["psg"]["num_images"] == 3 and res["psg"]["num_images_strict"] == 4
    assert res["psg"]["R@20"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 3) / 3)
    assert res["psg"]["R@20_strict"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 3) / 4)
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100.0)
