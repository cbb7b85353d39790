"""PSGEvaluator on hand-computed cases (see psg_eval_cases.py for image A's geometry)."""

import json
import math

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from psg_eval_cases import (
    IMAGE_A,
    PREDICATES,
    make_dataset,  # noqa: F401 (pytest fixture)
    make_output,
    seg_a,
)

from spade.config import add_spade_config
from spade.evaluation.psg_evaluation import PSGEvaluator

GT_TRIPLETS_A = [(1, 2, 0), (1, 3, 1), (2, 1, 2)]  # image A's relations in segment ids


def run(name, outputs, dicts, **kwargs):
    ev = PSGEvaluator(name, **kwargs)  # distributed=True: gathers through comm (1 process here)
    ev.reset()
    for d, out in zip(dicts, outputs):
        ev.process([{"image_id": d["image_id"]}], [out])
    return ev.evaluate()


def test_perfect_prediction_is_100(make_dataset, tmp_path):
    name, dicts = make_dataset([IMAGE_A])
    out = make_output(seg_a(), IMAGE_A["segments"], GT_TRIPLETS_A)
    res = run(name, [out], dicts, output_dir=str(tmp_path / "out"))
    psg = res["psg"]
    for k in (20, 50, 100):
        for key in (f"R@{k}", f"mR@{k}", f"R@{k}_strict", f"ngR@{k}", f"ngmR@{k}"):
            assert psg[key] == pytest.approx(100.0), key
        assert psg[f"R@{k}_near"] == pytest.approx(100.0)
        assert psg[f"R@{k}_distant"] == pytest.approx(100.0)
    assert psg["num_images"] == 1
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert res["panoptic_seg"]["PQ_st"] == pytest.approx(100.0)
    saved = json.load(open(tmp_path / "out" / "psg_evaluation.json"))
    assert saved["psg"]["R@20"] == pytest.approx(100.0)
    assert saved["per_predicate"]["psg"]["on"]["R@100"] == pytest.approx(100.0)
    assert (tmp_path / "out" / "per_predicate_recall.png").stat().st_size > 1000


def test_one_label_wrong(make_dataset):
    name, dicts = make_dataset([IMAGE_A])
    segments = [(1, 0), (2, 1), (3, 1)]  # "sky" predicted as "square": kills (1 above 3) only
    res = run(name, [make_output(seg_a(), segments, GT_TRIPLETS_A)], dicts)["psg"]
    assert res["R@20"] == pytest.approx(200 / 3)
    assert res["mR@20"] == pytest.approx(200 / 3)  # on 1, above 0, left of 1
    assert res["R@100-above"] == 0.0 and res["R@100-on"] == 100.0
    assert res["R@20_distant"] == 0.0 and res["R@20_near"] == 100.0


@pytest.mark.parametrize("covered, matched", [(49, False), (50, True), (51, True)])
def test_mask_iou_threshold(make_dataset, covered, matched):
    seg = np.zeros((10, 20), dtype=np.int64)
    seg[:, :10] = 1  # 100 px
    seg[:, 10:] = 2
    name, dicts = make_dataset(
        [{"seg": seg, "segments": [(1, 0), (2, 1)], "relations": [[0, 1, 0]]}]
    )
    pred = seg.copy()
    pred[:, :10] = 0
    pred.reshape(-1)[np.flatnonzero(seg.reshape(-1) == 1)[:covered]] = 1  # IoU = covered / 100
    res = run(name, [make_output(pred, [(1, 0), (2, 1)], [(1, 2, 0)])], dicts)["psg"]
    assert res["R@20"] == (100.0 if matched else 0.0)


@pytest.mark.parametrize("wrong_rows, r20, r50", [(19, 100.0, 100.0), (20, 0.0, 100.0)])
def test_rank_20_vs_21(make_dataset, wrong_rows, r20, r50):
    name, dicts = make_dataset([IMAGE_A])
    triplets = [(3, 1, 0)] * wrong_rows + [(1, 2, 0)]  # the right triplet at rank wrong_rows + 1
    res = run(name, [make_output(seg_a(), IMAGE_A["segments"], triplets)], dicts)["psg"]
    assert res["R@20"] == pytest.approx(r20 / 3)
    assert res["R@50"] == pytest.approx(r50 / 3)


def test_several_predicates_per_pair_multi_vs_single(make_dataset):
    image = dict(IMAGE_A, relations=[[0, 1, 0], [0, 1, 1]])  # one pair, two predicates
    name, dicts = make_dataset([image])
    out = make_output(seg_a(), IMAGE_A["segments"], [(1, 2, 0), (1, 2, 1)])
    res = run(name, [out], dicts, protocol="both")
    assert res["psg"]["R@20"] == pytest.approx(100.0)  # multi: both rows count
    assert res["psg_single"]["R@20"] == pytest.approx(50.0)  # single: one predicate per pair


def test_image_without_predictions_standard_vs_strict(make_dataset):
    name, dicts = make_dataset([IMAGE_A, dict(IMAGE_A, image_id="b")])
    outs = [
        make_output(seg_a(), IMAGE_A["segments"], GT_TRIPLETS_A),
        make_output(seg_a(), IMAGE_A["segments"], []),
    ]
    res = run(name, outs, dicts)["psg"]
    assert res["R@20"] == pytest.approx(100.0)  # benchmark: image b skipped
    assert res["mR@20"] == pytest.approx(100.0)
    assert res["R@20_strict"] == pytest.approx(50.0)  # counted as 0
    assert res["mR@20_strict"] == pytest.approx(50.0)
    assert (res["num_images"], res["num_images_strict"]) == (1, 2)
    assert res["num_images_without_relations"] == 1


def test_predicate_absent_from_ground_truth(make_dataset):
    name, dicts = make_dataset([IMAGE_A], predicates=PREDICATES + ["far from"])
    out = make_output(seg_a(), IMAGE_A["segments"], GT_TRIPLETS_A, num_predicates=4)
    res = run(name, [out], dicts)["psg"]
    assert res["R@20"] == pytest.approx(100.0)
    assert res["mR@20"] == pytest.approx(75.0)  # 3 of 4 predicates at 100, absent counts 0
    assert res["mR@20_present"] == pytest.approx(100.0)
    assert math.isnan(res["R@100-far from"])


def test_distant_vs_near(make_dataset):
    name, dicts = make_dataset([IMAGE_A])
    out = make_output(seg_a(), IMAGE_A["segments"], [(1, 3, 1)])  # only the distant triplet
    res = run(name, [out], dicts)["psg"]
    assert res["R@20_distant"] == pytest.approx(100.0)
    assert res["R@20_near"] == pytest.approx(0.0)
    assert res["R@20"] == pytest.approx(100 / 3)


def test_open_vocabulary_split(make_dataset):
    split = {
        "base_objects": THINGS_STUFF,
        "novel_objects": [],
        "novel_predicates": ["above"],
        "base_predicates": ["on", "left of"],
    }
    name, dicts = make_dataset([IMAGE_A], ov_split=split)
    out = make_output(seg_a(), IMAGE_A["segments"], [(1, 2, 0), (2, 1, 2)])
    res = run(name, [out], dicts)["psg"]
    assert res["R@20_base"] == pytest.approx(100.0) and res["R@20_novel"] == 0.0
    assert res["mR@20_base"] == pytest.approx(100.0) and res["mR@20_novel"] == 0.0


THINGS_STUFF = ["circle", "square", "sky"]


def test_empty_ground_truth_graph(make_dataset):
    name, dicts = make_dataset([dict(IMAGE_A, relations=[])])
    res = run(name, [make_output(seg_a(), IMAGE_A["segments"], GT_TRIPLETS_A)], dicts)["psg"]
    assert res["num_images_strict"] == 0 and math.isnan(res["R@20"])
    assert res["mR@20"] == 0.0


def test_box_only_matching(make_dataset):
    seg = np.zeros((10, 20), dtype=np.int64)
    seg[:, :10], seg[:, 10:] = 1, 2
    name, dicts = make_dataset(
        [{"seg": seg, "segments": [(1, 0), (2, 1)], "relations": [[0, 1, 0]]}], box_only=True
    )
    for rows, expect in ((5, 100.0), (4, 0.0)):  # tight box IoU 0.5 passes, 0.4 fails
        pred = seg.copy()
        pred[rows:, :10] = 0
        res = run(name, [make_output(pred, [(1, 0), (2, 1)], [(1, 2, 0)])], dicts)
        assert res["psg"]["R@20"] == expect and "panoptic_seg" not in res


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda o, d: d.update(image_id="nope"), "image nope: image_id"),
        (
            lambda o, d: o["relations"].update(triplets=torch.tensor([[1, 9, 0]])),
            "relations.triplets",
        ),
        (lambda o, d: o["relations"]["triplets"].__setitem__((0, 2), 7), "predicate outside 0..2"),
        (
            lambda o, d: o.update(
                panoptic_seg=(torch.zeros(5, 5, dtype=torch.int32), o["panoptic_seg"][1])
            ),
            "panoptic_seg has size",
        ),
        (lambda o, d: o["relations"]["scores"].__setitem__(0, float("nan")), "relations.scores"),
        (
            lambda o, d: o["relations"]["predicate_scores"].__setitem__((1, 1), float("nan")),
            "predicate_scores contains NaN",
        ),
        (lambda o, d: o["panoptic_seg"][1][0].update(category_id=9), "category_id [9]"),
    ],
)
def test_bad_input_names_image_and_field(make_dataset, mutate, message):
    name, dicts = make_dataset([IMAGE_A])
    out = make_output(seg_a(), IMAGE_A["segments"], GT_TRIPLETS_A)
    inp = {"image_id": dicts[0]["image_id"]}
    mutate(out, inp)
    ev = PSGEvaluator(name, distributed=False)
    with pytest.raises(ValueError, match="image ") as err:
        ev.process([inp], [out])
    assert message in str(err.value)


@pytest.mark.parametrize("protocol, tasks", [("single", ["psg"]), ("both", ["psg", "psg_single"])])
def test_built_from_config(make_dataset, protocol, tasks):
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.TEST.PSG_EVAL.PROTOCOL = protocol
    cfg.TEST.PSG_EVAL.RECALL_KS = [1, 2]
    cfg.TEST.PSG_EVAL.PANOPTIC = False
    name, dicts = make_dataset([dict(IMAGE_A, relations=[[0, 1, 0], [0, 1, 1]])])
    ev = PSGEvaluator(cfg, name)
    out = make_output(seg_a(), IMAGE_A["segments"], [(1, 2, 0), (1, 2, 1)])
    ev.process([{"image_id": dicts[0]["image_id"]}], [out])
    res = ev.evaluate()
    assert list(res) == tasks
    assert res["psg"]["R@1"] == pytest.approx(50.0)
    assert res["psg"]["R@2"] == pytest.approx(50.0 if protocol == "single" else 100.0)
