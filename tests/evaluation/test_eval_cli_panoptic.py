"""PQ through panopticapi, the file-based command line, and the submission writer."""

import json
import os

import pytest
from panopticapi.evaluation import pq_compute
from panopticapi.utils import id2rgb
from PIL import Image
from psg_eval_cases import (
    IMAGE_A,
    PREDICATES,
    STUFF,
    THINGS,
    make_dataset,  # noqa: F401 (pytest fixture)
    make_output,
    seg_a,
)

from spade.evaluation.psg_evaluation import PSGEvaluator, main
from spade.evaluation.submission import export_submission

IMAGES = [
    IMAGE_A,
    dict(IMAGE_A, image_id="b", relations=[[1, 2, 0], [0, 1, 0], [0, 1, 2]]),
    dict(IMAGE_A, image_id="c", relations=[]),  # dropped by the benchmark's test loader
    dict(IMAGE_A, image_id="d"),  # its prediction has no relation rows
]


def _perturbed_seg():
    seg = seg_a()
    seg[:6, 5:10] = 1  # segment 2 loses 30 of 50 px to segment 1
    seg[:, 20:23] = 0  # sky loses 30 px to void
    return seg


def _outputs():
    segs = [(1, 0), (2, 1), (3, 2)]
    return {
        "img0": make_output(seg_a(), segs, [(1, 2, 0), (1, 3, 0), (1, 3, 1), (2, 1, 2)]),
        "b": make_output(_perturbed_seg(), [(1, 0), (2, 1), (3, 1)], [(2, 3, 0), (1, 2, 0)]),
        "c": make_output(seg_a(), segs, [(1, 2, 0)]),
        "d": make_output(seg_a(), segs, []),
    }


def _in_process(name, dicts, outputs):
    ev = PSGEvaluator(name, distributed=False, protocol="both")
    for d in dicts:
        ev.process([{"image_id": d["image_id"]}], [outputs[d["image_id"]]])
    return ev.evaluate()


def _write_psg_json(dicts, tmp_path):
    data = []
    for d in dicts:
        segs = [
            {k: s[k] for k in ("id", "category_id", "iscrowd", "isthing", "area")}
            for s in d["segments_info"]
        ]
        anns = [
            {"bbox": s["bbox"], "bbox_mode": 0, "category_id": s["category_id"]}
            for s in d["segments_info"]
        ]
        data.append(
            {
                "file_name": "x.jpg",
                "height": d["height"],
                "width": d["width"],
                "image_id": d["image_id"],
                "pan_seg_file_name": os.path.basename(d["pan_seg_file_name"]),
                "segments_info": segs,
                "annotations": anns,
                "relations": d["relations"],
            }
        )
    data.append(dict(data[0], image_id="train0"))  # not a test image
    path = tmp_path / "psg.json"
    path.write_text(
        json.dumps(
            {
                "data": data,
                "thing_classes": THINGS,
                "stuff_classes": STUFF,
                "predicate_classes": PREDICATES,
                "test_image_ids": [d["image_id"] for d in dicts],
            }
        )
    )
    return str(path)


def test_cli_round_trip_matches_in_process(make_dataset, tmp_path, capsys):
    name, dicts = make_dataset(IMAGES)
    outputs = _outputs()
    # the benchmark's test set has no image without relations: leave "c" out of PQ here too
    expected = _in_process(name, [d for d in dicts if d["relations"]], outputs)
    sub = tmp_path / "submission"
    export_submission(outputs, dicts, str(sub))
    entries = json.load(open(sub / "relation.json"))
    assert [e["image_id"] for e in entries] == ["img0", "b", "d"]
    assert entries[0]["relations"][0] == [0, 1, 1] and entries[0]["segments_info"][2] == {
        "id": 3,
        "category_id": 3,
    }  # 1-based category and predicate
    out_json = tmp_path / "scores.json"
    argv = [
        "--gt",
        _write_psg_json(dicts, tmp_path),
        "--seg-root",
        str(tmp_path),
        "--pred-dir",
        str(sub),
        "--protocol",
        "both",
        "--output",
        str(out_json),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    rows = [line.split("|")[0].strip() for line in printed[3:9]]
    assert rows == ["R@20", "R@50", "R@100", "mR@20", "mR@50", "mR@100"]
    got = json.load(open(out_json))
    for task in ("psg", "psg_single", "panoptic_seg"):
        for key, value in expected[task].items():
            if key.startswith("ng"):
                continue  # the file format keeps one-hot predicate rows only
            if value != value:
                assert got[task][key] is None, key
            else:
                assert got[task][key] == pytest.approx(value), (task, key)
    assert 0 < expected["psg"]["R@20"] < 100 and expected["psg"]["num_images"] == 2
    assert expected["psg"]["R@20_strict"] < expected["psg"]["R@20"]


def test_cli_summarises_bad_entries(make_dataset, tmp_path, capsys):
    name, dicts = make_dataset(IMAGES)
    sub = tmp_path / "submission"
    export_submission(_outputs(), dicts, str(sub))
    entries = json.load(open(sub / "relation.json"))
    entries[0]["relations"][0][2] = 0  # predicates are 1-based
    entries[1]["relations"][0][1] = 9  # no segment 9
    os.remove(sub / "panseg" / entries[2]["pan_seg_file_name"])
    (sub / "relation.json").write_text(json.dumps(entries + [entries[0]]))
    argv = [
        "--gt",
        _write_psg_json(dicts, tmp_path),
        "--seg-root",
        str(tmp_path),
        "--pred-dir",
        str(sub),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "4 bad entries" in err
    assert "relation.json has 4 entries, the test split of" in err
    assert "psg.json has 3 images with relations" in err
    assert "image img0: relation.json: relations rows [0] have predicate [0] outside 1..3" in err
    assert "image b: relation.json: relations rows [0] point at a segment that does not" in err
    assert "image d: panoptic PNG not found:" in err and "panseg/2.png (pan_seg_file_name)" in err
    assert "Traceback" not in err


def test_export_rejects_missing_prediction(make_dataset, tmp_path):
    _, dicts = make_dataset(IMAGES)
    outputs = _outputs()
    del outputs["b"]
    with pytest.raises(ValueError, match="image b: no prediction"):
        export_submission(outputs, dicts, str(tmp_path / "s"))


def test_pq_matches_panopticapi(make_dataset, tmp_path):
    name, dicts = make_dataset([IMAGES[1]])
    segs = [(1, 0), (2, 1), (3, 2)]
    res = _in_process(name, dicts, {"b": make_output(_perturbed_seg(), segs, [])})["panoptic_seg"]
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    Image.open(dicts[0]["pan_seg_file_name"]).save(gt_dir / "b.png")
    Image.fromarray(id2rgb(_perturbed_seg())).save(pred_dir / "b.png")
    cats = [{"id": i, "name": n, "isthing": int(i < 2)} for i, n in enumerate(THINGS + STUFF)]
    gt_json = {
        "categories": cats,
        "annotations": [
            {
                "image_id": "b",
                "file_name": "b.png",
                "segments_info": [
                    {
                        "id": s["id"],
                        "category_id": s["category_id"],
                        "iscrowd": 0,
                        "area": s["area"],
                    }
                    for s in dicts[0]["segments_info"]
                ],
            }
        ],
    }
    pred_json = {
        "annotations": [
            {
                "image_id": "b",
                "file_name": "b.png",
                "segments_info": [{"id": i, "category_id": c} for i, c in segs],
            }
        ]
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "pred.json").write_text(json.dumps(pred_json))
    ref = pq_compute(
        str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), str(gt_dir), str(pred_dir)
    )
    for suffix, group in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
        for key in ("pq", "sq", "rq"):
            assert res[key.upper() + suffix] == pytest.approx(100 * ref[group][key])
    # square (IoU 20/50) is missed: PQ 0; circle (IoU 50/80) and sky (IoU 70/100) are matched
    assert res["PQ"] == pytest.approx(100 * (50 / 80 + 0 + 70 / 100) / 3)
    assert res["PQ_th"] == pytest.approx(100 * (50 / 80) / 2)
