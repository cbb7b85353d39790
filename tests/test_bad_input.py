"""Malformed input on every surface a user hands SPADE a file or a flag (the evaluator's own
cases live in tests/evaluation/test_eval_bad_input.py).

Each row: a malformed input, the error it must raise, and the substrings that name the culprit
(file, image id, field, key or option). Every message is one line. Command-line tools turn these
errors into ``<prog>: error: <message>`` and exit status 2 (the last tests)."""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THINGS, STUFF, PREDS = ["cup", "ball"], ["table"], ["on", "next to"]


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load("demo_bad_input", "projects/SPADE/demo.py")


# ------------------------------------------------------------------ a tiny valid PSG dataset
def _rgb_ids(ids):
    ids = np.asarray(ids, dtype=np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _valid_psg():
    return {
        "thing_classes": list(THINGS),
        "stuff_classes": list(STUFF),
        "predicate_classes": list(PREDS),
        "test_image_ids": [],
        "data": [
            {
                "file_name": "1.png",
                "height": 4,
                "width": 4,
                "image_id": 1,
                "pan_seg_file_name": "1_seg.png",
                "segments_info": [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 2}],
                "relations": [[0, 1, 0]],
            }
        ],
    }


def _write_dataset(tmp, psg=None, raw=None):
    tmp = str(tmp)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(os.path.join(tmp, "1.png"))
    ids = np.ones((4, 4), np.uint32)
    ids[2:] = 2
    Image.fromarray(_rgb_ids(ids)).save(os.path.join(tmp, "1_seg.png"))
    path = os.path.join(tmp, "psg.json")
    with open(path, "wb") as f:
        f.write(raw if raw is not None else json.dumps(psg).encode())
    return path


def _psg_case(mutate=None, raw=None):
    def run(tmp):
        from spade.data.datasets.psg import load_psg_json

        psg = _valid_psg()
        if mutate:
            mutate(psg)
        path = _write_dataset(tmp, psg, raw)
        load_psg_json(path, str(tmp), str(tmp), "all")

    return run


def _img(**changes):
    def mutate(psg):
        psg["data"][0].update(changes)

    return mutate


def _seg(k, **changes):
    def mutate(psg):
        psg["data"][0]["segments_info"][k].update(changes)

    return mutate


def _dup_image(psg):
    psg["data"].append(copy.deepcopy(psg["data"][0]))


def _png_case(ids, segments):
    def run(tmp):
        from spade.data.dataset_mapper import SPADEDatasetMapper

        path = os.path.join(str(tmp), "seg.png")
        Image.fromarray(_rgb_ids(ids)).save(path)
        d = {"pan_seg_file_name": path, "image_id": "7", "segments_info": segments}
        SPADEDatasetMapper._segment_index_map(d, (4, 4))

    return run


# ------------------------------------------------------------------ images, vocabularies
def _image_case(content):
    def run(tmp):
        from spade.data.image_io import read_image

        path = os.path.join(str(tmp), "photo.jpg")
        if content is not None:
            open(path, "wb").write(content)
        read_image(path)

    return run


def _vocab_case(value_fn, option="--classes"):
    def run(tmp):
        demo.parse_vocabulary(value_fn(str(tmp)), option)

    return run


def _names_file(tmp, text=b"cat\nsofa\n"):
    path = os.path.join(tmp, "names.txt")
    open(path, "wb").write(text)
    return path


# ------------------------------------------------------------------ configs
def _cfg_case(yaml_text=None, opts=(), missing=False):
    def run(tmp):
        from detectron2.config import get_cfg

        from spade.config import add_spade_config
        from spade.engine.defaults import merge_config

        path = ""
        if yaml_text is not None or missing:
            path = os.path.join(str(tmp), "bad.yaml")
            if not missing:
                open(path, "w").write(yaml_text)
        cfg = get_cfg()
        add_spade_config(cfg)
        merge_config(cfg, path, list(opts))

    return run


# ------------------------------------------------------------------ checkpoints
def _ckpt_case(name, content):
    def run(tmp):
        from spade.engine import SafetensorsCheckpointer

        path = os.path.join(str(tmp), name)
        if content is not None:
            open(path, "wb").write(content)
        SafetensorsCheckpointer(torch.nn.Linear(2, 2), str(tmp)).load(path)

    return run


def _missing_psg(tmp):
    from spade.data.datasets.psg import load_psg_json

    load_psg_json(os.path.join(str(tmp), "psg.json"), str(tmp), str(tmp), "all")


CASES = [
    # dataset json (spade.data.datasets.psg)
    ("psg.json missing", _missing_psg, FileNotFoundError, ["psg.json", "does not exist"]),
    (
        "psg.json not JSON",
        _psg_case(raw=b'{"data": [,]}'),
        ValueError,
        ["psg.json", "not valid JSON", "line 1"],
    ),
    (
        "psg.json not UTF-8",
        _psg_case(raw=b'{"data": "\xff\xfe"}'),
        ValueError,
        ["psg.json", "not UTF-8"],
    ),
    (
        "psg.json top level a list",
        _psg_case(raw=b"[1, 2]"),
        ValueError,
        ["psg.json", "top level is list"],
    ),
    (
        "missing top-level field",
        _psg_case(lambda p: p.pop("predicate_classes")),
        ValueError,
        ["psg.json", "'predicate_classes'"],
    ),
    (
        "class name twice",
        _psg_case(lambda p: p["stuff_classes"].append("cup")),
        ValueError,
        ["psg.json", "'stuff_classes'", "cup"],
    ),
    (
        "empty predicate list",
        _psg_case(lambda p: p.update(predicate_classes=[])),
        ValueError,
        ["psg.json", "'predicate_classes' is empty"],
    ),
    (
        "duplicate image id",
        _psg_case(_dup_image),
        ValueError,
        ["psg.json", "image_id 1", "repeated"],
    ),
    (
        "image missing field",
        _psg_case(lambda p: p["data"][0].pop("file_name")),
        ValueError,
        ["psg.json", "image_id 1", "'file_name'"],
    ),
    (
        "height not an int",
        _psg_case(_img(height="4")),
        ValueError,
        ["psg.json", "image_id 1", "'height'"],
    ),
    (
        "fractional relation index",
        _psg_case(_img(relations=[[0, 1.5, 0]])),
        ValueError,
        ["image_id 1", "relations[0]", "3 ints"],
    ),
    (
        "relation row with 4 columns",
        _psg_case(_img(relations=[[0, 1, 0, 1]])),
        ValueError,
        ["image_id 1", "relations[0]", "[0, 1, 0, 1]"],
    ),
    (
        "relation subject out of range",
        _psg_case(_img(relations=[[5, 1, 0]])),
        ValueError,
        ["image_id 1", "relations[0]", "segment index out of range"],
    ),
    (
        "predicate out of range",
        _psg_case(_img(relations=[[0, 1, 9]])),
        ValueError,
        ["image_id 1", "relations[0]", "predicate index"],
    ),
    (
        "relations not a list",
        _psg_case(_img(relations="none")),
        ValueError,
        ["image_id 1", "'relations'"],
    ),
    (
        "category_id out of range",
        _psg_case(_seg(0, category_id=3)),
        ValueError,
        ["image_id 1", "segments_info[0].category_id"],
    ),
    (
        "fractional segment id",
        _psg_case(_seg(1, id=2.5)),
        ValueError,
        ["image_id 1", "segments_info[1].id"],
    ),
    (
        "segment id repeated",
        _psg_case(_seg(1, id=1)),
        ValueError,
        ["image_id 1", "segments_info[1].id 1 is repeated"],
    ),
    (
        "image file missing",
        _psg_case(_img(file_name="nothere.png")),
        FileNotFoundError,
        ["image_id 1", "file_name", "nothere.png"],
    ),
    # panoptic PNG vs segments_info, both ways (spade.data.dataset_mapper)
    (
        "PNG id not in segments_info",
        _png_case([[1] * 4] * 2 + [[3] * 4] * 2, [{"id": 1}]),
        ValueError,
        ["seg.png", "image_id 7", "[3]", "not in segments_info"],
    ),
    (
        "segments_info id not in PNG",
        _png_case([[1] * 4] * 4, [{"id": 1}, {"id": 5}]),
        ValueError,
        ["seg.png", "image_id 7", "[5]", "do not occur in the PNG"],
    ),
    (
        "PNG of another size",
        _png_case([[1] * 3] * 4, [{"id": 1}]),
        ValueError,
        ["seg.png", "image_id 7", "(W, H)"],
    ),
    # images (spade.data.image_io, used by demo.py and the dataset mapper)
    ("image missing", _image_case(None), FileNotFoundError, ["photo.jpg", "does not exist"]),
    (
        "image not an image",
        _image_case(b"GIF89a broken"),
        OSError,
        ["photo.jpg", "cannot read image"],
    ),
    (
        "image truncated",
        _image_case(b"\x89PNG\r\n\x1a\n\x00\x00"),
        OSError,
        ["photo.jpg", "cannot read image"],
    ),
    # vocabularies (--classes / --predicates)
    (
        "@file missing",
        _vocab_case(lambda t: "@" + os.path.join(t, "nope.txt")),
        FileNotFoundError,
        ["--classes", "nope.txt", "does not exist"],
    ),
    (
        "@file not UTF-8",
        _vocab_case(lambda t: "@" + _names_file(t, b"\xff\xfe"), "--predicates"),
        ValueError,
        ["--predicates", "names.txt", "not UTF-8"],
    ),
    (
        "@file empty",
        _vocab_case(lambda t: "@" + _names_file(t, b"# none\n\n")),
        ValueError,
        ["--classes", "no names", "names.txt"],
    ),
    (
        "file path without @",
        _vocab_case(lambda t: _names_file(t)),
        ValueError,
        ["--classes", "names.txt", "write @"],
    ),
    ("comma list empty", _vocab_case(lambda t: " , "), ValueError, ["--classes", "no names"]),
    (
        "name given twice",
        _vocab_case(lambda t: "on,under,on", "--predicates"),
        ValueError,
        ["--predicates", "twice", "'on'"],
    ),
    # configs (spade.engine.defaults.merge_config)
    (
        "config file missing",
        _cfg_case(missing=True),
        FileNotFoundError,
        ["--config-file", "bad.yaml", "does not exist"],
    ),
    (
        "config unknown key",
        _cfg_case("MODEL:\n  SPADE:\n    FOO: 1\n"),
        ValueError,
        ["bad.yaml", "MODEL.SPADE.FOO"],
    ),
    (
        "config value of wrong type",
        _cfg_case("SOLVER:\n  MAX_ITER: many\n"),
        ValueError,
        ["bad.yaml", "SOLVER.MAX_ITER"],
    ),
    ("config YAML syntax", _cfg_case("SOLVER: [unclosed\n"), ValueError, ["bad.yaml"]),
    (
        "opts odd length",
        _cfg_case(opts=["SOLVER.MAX_ITER"]),
        ValueError,
        ["command-line opts", "odd length"],
    ),
    (
        "opts unknown key",
        _cfg_case(opts=["SOLVER.MAX_ITERS", "3"]),
        ValueError,
        ["command-line opts", "SOLVER.MAX_ITERS"],
    ),
    (
        "value not among choices",
        _cfg_case(opts=["SOLVER.NONFINITE_LOSS", "ignore"]),
        ValueError,
        ["SOLVER.NONFINITE_LOSS", "'ignore'", "raise"],
    ),
    (
        "value out of range",
        _cfg_case(opts=["MODEL.SPADE.OPEN_VOCAB.FUSION_ALPHA", "1.5"]),
        ValueError,
        ["MODEL.SPADE.OPEN_VOCAB.FUSION_ALPHA", "1.5"],
    ),
    (
        "void query share out of range",
        _cfg_case(opts=["MODEL.SPADE.MASK_HEAD.VOID_QUERY_SHARE", "1.5"]),
        ValueError,
        ["MODEL.SPADE.MASK_HEAD.VOID_QUERY_SHARE", "1.5"],
    ),
    (
        "predicate fusion out of range",
        _cfg_case(opts=["MODEL.SPADE.RELATION.FUSION_BETA", "-0.5"]),
        ValueError,
        ["MODEL.SPADE.RELATION.FUSION_BETA", "-0.5", "-1"],
    ),
    # checkpoints (MODEL.WEIGHTS through SafetensorsCheckpointer)
    (
        "weights missing",
        _ckpt_case("model.safetensors", None),
        FileNotFoundError,
        ["model.safetensors", "does not exist", "MODEL.WEIGHTS"],
    ),
    (
        "weights not safetensors",
        _ckpt_case("model.safetensors", b"garbage"),
        ValueError,
        ["model.safetensors", "not a valid safetensors"],
    ),
    (
        "weights pickled",
        _ckpt_case("model.pkl", b"\x80\x04N."),
        ValueError,
        ["model.pkl", "pickled files are never loaded"],
    ),
    (
        "weights .pth corrupt",
        _ckpt_case("model.pth", b"PK\x03\x04 truncated"),
        ValueError,
        ["model.pth", "weights_only=True"],
    ),
]


def test_table_has_at_least_28_cases():
    assert len(CASES) >= 28


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_the_culprit_in_one_line(case, tmp_path):
    _, run, exc_type, culprits = case
    with pytest.raises(exc_type) as info:
        run(tmp_path)
    message = str(info.value.args[0] if isinstance(info.value, KeyError) else info.value)
    assert "\n" not in message, message
    for culprit in culprits:
        assert culprit in message, (culprit, message)


# ------------------------------------------------------------------ command-line tools
def test_demo_cli_exits_2_with_one_line_and_debug_shows_the_error(tmp_path, capsys):
    argv = ["--input", str(tmp_path / "nothere.jpg"), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"demo.py: error: --input {tmp_path / 'nothere.jpg'} does not exist"]
    with pytest.raises(FileNotFoundError, match="nothere.jpg"):
        demo.main(argv + ["--debug"])


def test_train_net_exits_2_on_an_unknown_config_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  SPADE:\n    NOT_A_KEY: 1\n")
    cmd = [sys.executable, os.path.join(ROOT, "projects", "SPADE", "train_net.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        cmd + ["--config-file", str(bad)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train_net.py: error: --config-file ") and "NOT_A_KEY" in last


# ------------------------------------------------------------------ images of any PIL mode
def _palette_image():
    image = Image.new("P", (2, 2), 0)
    image.putpalette([10, 10, 10] + [0] * 765)
    return image


@pytest.mark.parametrize(
    "mode, make, expected",
    [
        ("I;16", lambda: Image.fromarray(np.full((2, 2), 65535, np.uint16)), 255),
        ("I;16 mid", lambda: Image.fromarray(np.full((2, 2), 32896, np.uint16)), 128),
        ("CMYK", lambda: Image.new("CMYK", (2, 2), (0, 0, 0, 0)), 255),
        ("P", lambda: _palette_image(), 10),
        ("RGBA transparent", lambda: Image.new("RGBA", (2, 2), (0, 0, 0, 0)), 255),
        ("LA opaque", lambda: Image.new("LA", (2, 2), (40, 255)), 40),
        ("F", lambda: Image.fromarray(np.full((2, 2), 0.5, np.float32)), 128),
    ],
)
def test_images_of_any_mode_become_8bit_rgb(mode, make, expected):
    from spade.data.image_io import pil_to_rgb

    rgb = pil_to_rgb(make())
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert abs(int(rgb[0, 0, 0]) - expected) <= 1, (mode, rgb[0, 0])
