"""Bad input to the file-based evaluator: one line naming the file / image id / field, exit
status 2, no traceback, nothing scored."""

import json
import os

import numpy as np
import pytest
from panopticapi.utils import id2rgb
from PIL import Image
from psg_files import write_psg_case

from spade.evaluation.psg_evaluation import main


@pytest.fixture
def case(tmp_path):
    gt_json, root, pred_dir = write_psg_case(str(tmp_path), 3, 24, 32, seed=3, rows=10)
    return {"gt": gt_json, "root": root, "pred": pred_dir, "tmp": tmp_path}


def _edit_json(path, fn):
    data = json.load(open(path))
    fn(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _gt(fn):
    return lambda c: _edit_json(c["gt"], fn)


def _sub(fn):
    return lambda c: _edit_json(os.path.join(c["pred"], "relation.json"), fn)


def _png(c, which, fn):
    if which == "gt":
        path = os.path.join(c["root"], "gt_0.png")
    else:
        path = os.path.join(c["pred"], "panseg", "0.png")
    ids = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint32)
    ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
    Image.fromarray(id2rgb(fn(ids.astype(np.int64)))).save(path)


def _first_id(c, where):
    if where == "gt":
        return json.load(open(c["gt"]))["data"][0]["segments_info"][0]["id"]
    return json.load(open(os.path.join(c["pred"], "relation.json")))[0]["segments_info"][0]["id"]


def _drop_segment(ids, sid):
    ids[ids == sid] = 0
    return ids


def _set(d, path, value):
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value


CASES = [
    ("gt_missing", lambda c: os.remove(c["gt"]), [], ["psg.json", "cannot read ground truth"]),
    (
        "gt_bad_json",
        lambda c: open(c["gt"], "w").write("{oops"),
        [],
        ["psg.json", "not valid JSON"],
    ),
    ("gt_not_object", lambda c: open(c["gt"], "w").write("[1]"), [], ["psg.json", "top level"]),
    ("gt_no_data", _gt(lambda d: d.pop("data")), [], ["psg.json", "'data'"]),
    (
        "gt_duplicate_image",
        _gt(lambda d: d["data"].insert(2, dict(d["data"][0]))),
        [],
        ["psg.json", "image 1000", "appears twice in the ground truth"],
    ),
    (
        "gt_relation_two_columns",
        _gt(lambda d: _set(d, ["data", 0, "relations", 0], [0, 1])),
        [],
        ["psg.json", "image 1000", "relations[0]"],
    ),
    (
        "gt_relation_float",
        _gt(lambda d: _set(d, ["data", 1, "relations", 0, 2], 1.5)),
        [],
        ["psg.json", "image 1001", "relations[0]", "1.5"],
    ),
    (
        "gt_relation_bool",
        _gt(lambda d: _set(d, ["data", 0, "relations", 0, 0], True)),
        [],
        ["psg.json", "image 1000", "relations[0]"],
    ),
    (
        "gt_relation_out_of_range",
        _gt(lambda d: _set(d, ["data", 0, "relations", 0, 1], 99)),
        [],
        ["psg.json", "image 1000", "relations[0]", "outside"],
    ),
    (
        "gt_predicate_out_of_range",
        _gt(lambda d: _set(d, ["data", 0, "relations", 0, 2], 56)),
        [],
        ["psg.json", "image 1000", "predicate 56 outside 0..55"],
    ),
    (
        "gt_category_out_of_range",
        _gt(lambda d: _set(d, ["data", 0, "annotations", 0, "category_id"], 500)),
        [],
        ["psg.json", "image 1000", "annotations[0].category_id"],
    ),
    (
        "gt_missing_field",
        _gt(lambda d: d["data"][1].pop("pan_seg_file_name")),
        [],
        ["psg.json", "image 1001", "'pan_seg_file_name'"],
    ),
    (
        "gt_empty_split",
        _gt(lambda d: d.update(test_image_ids=[])),
        [],
        ["psg.json", "'test' split has no image with ground-truth relations"],
    ),
    (
        "gt_no_relations",
        _gt(lambda d: [im.update(relations=[]) for im in d["data"]]),
        [],
        ["psg.json", "no image with ground-truth relations"],
    ),
    (
        "gt_png_missing",
        lambda c: os.remove(os.path.join(c["root"], "gt_1.png")),
        [],
        ["image 1001", "gt_1.png", "not found"],
    ),
    (
        "gt_png_unlisted_id",
        lambda c: _png(c, "gt", lambda ids: np.where(ids == ids[0, 0], 77, ids)),
        [],
        ["image 1000", "gt_0.png", "[77] not in psg.json segments_info"],
    ),
    (
        "gt_segment_without_pixels",
        lambda c: _png(c, "gt", lambda ids: _drop_segment(ids, _first_id(c, "gt"))),
        [],
        ["image 1000", "psg.json segments_info id(s)", "have no pixel in", "gt_0.png"],
    ),
    (
        "gt_png_wrong_size",
        lambda c: Image.new("RGB", (5, 5)).save(os.path.join(c["root"], "gt_2.png")),
        [],
        ["image 1002", "gt_2.png", "5x5", "24x32"],
    ),
    (
        "sub_missing",
        lambda c: os.remove(os.path.join(c["pred"], "relation.json")),
        [],
        ["relation.json", "not found"],
    ),
    (
        "sub_bad_json",
        lambda c: open(os.path.join(c["pred"], "relation.json"), "w").write("[{"),
        [],
        ["relation.json", "not valid JSON"],
    ),
    ("sub_empty", _sub(lambda d: d.clear()), [], ["relation.json has 0 entries", "psg.json has 3"]),
    (
        "sub_not_list",
        lambda c: open(os.path.join(c["pred"], "relation.json"), "w").write('{"a": 1}'),
        [],
        ["relation.json", "top level must be a list"],
    ),
    (
        "sub_relation_four_columns",
        _sub(lambda d: _set(d, [0, "relations", 0], [0, 1, 2, 3])),
        [],
        ["image 1000", "relation.json", "relations[0] must be 3 integers"],
    ),
    (
        "sub_relation_float",
        _sub(lambda d: _set(d, [1, "relations", 2, 2], 1.5)),
        [],
        ["image 1001", "relation.json", "relations[2]", "1.5"],
    ),
    (
        "sub_relation_bool",
        _sub(lambda d: _set(d, [0, "relations", 0, 1], False)),
        [],
        ["image 1000", "relation.json", "relations[0]"],
    ),
    (
        "sub_subject_out_of_range",
        _sub(lambda d: _set(d, [2, "relations", 0, 0], 999)),
        [],
        ["image 1002", "relation.json", "relations rows [0]", "segment that does not exist"],
    ),
    (
        "sub_predicate_zero",
        _sub(lambda d: _set(d, [0, "relations", 1, 2], 0)),
        [],
        ["image 1000", "relation.json", "relations rows [1]", "outside 1..56"],
    ),
    (
        "sub_category_out_of_range",
        _sub(lambda d: _set(d, [1, "segments_info", 0, "category_id"], 0)),
        [],
        ["image 1001", "relation.json", "segments_info[0].category_id 0 outside 1..133"],
    ),
    (
        "sub_missing_field",
        _sub(lambda d: d[0].pop("segments_info")),
        [],
        ["image 1000", "relation.json", "missing field 'segments_info'"],
    ),
    (
        "sub_png_missing",
        lambda c: os.remove(os.path.join(c["pred"], "panseg", "1.png")),
        [],
        ["image 1001", "panseg/1.png", "not found", "pan_seg_file_name"],
    ),
    (
        "sub_png_unlisted_id",
        lambda c: _png(c, "pred", lambda ids: np.where(ids == ids[0, 0], 4321, ids)),
        [],
        ["image 1000", "panseg/0.png", "[4321] not in relation.json segments_info"],
    ),
    (
        "sub_segment_without_pixels",
        lambda c: _png(c, "pred", lambda ids: _drop_segment(ids, _first_id(c, "pred"))),
        [],
        ["image 1000", "relation.json segments_info id(s)", "have no pixel in", "panseg/0.png"],
    ),
    (
        "sub_image_order",
        _sub(lambda d: d.reverse()),
        [],
        ["image 1000", "entry image_id is '1002' (order mismatch)"],
    ),
    ("pred_dir_missing", lambda c: None, ["--pred-dir", "/nonexistent/sub"], ["/nonexistent/sub"]),
    ("workers_zero", lambda c: None, ["--workers", "0"], ["--workers must be >= 1"]),
    (
        "ov_split_unknown_name",
        lambda c: (c["tmp"] / "ov.json").write_text(json.dumps({"novel_predicates": ["fly"]})),
        ["--ov-split", "OV"],
        ["ov.json", "unknown classes", "fly"],
    ),
]


@pytest.mark.parametrize(
    "mutate, extra, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_exit_2(case, capsys, mutate, extra, expected):
    mutate(case)
    extra = [str(case["tmp"] / "ov.json") if a == "OV" else a for a in extra]
    argv = ["--gt", case["gt"], "--seg-root", case["root"], "--pred-dir", case["pred"]]
    argv += ["--workers", "1", *extra]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and out == ""
    for text in expected:
        assert text in err, (text, err)


def test_debug_shows_the_traceback(case):
    os.remove(case["gt"])
    argv = ["--gt", case["gt"], "--seg-root", case["root"], "--pred-dir", case["pred"], "--debug"]
    with pytest.raises(ValueError, match="psg.json"):
        main(argv)


def test_the_unmodified_case_scores(case, capsys):
    argv = ["--gt", case["gt"], "--seg-root", case["root"], "--pred-dir", case["pred"]]
    assert main(argv + ["--workers", "1"]) == 0
    assert "R@20" in capsys.readouterr().out
