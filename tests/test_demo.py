"""projects/SPADE/demo.py and SPADEPredictor: input expansion, vocabulary parsing, output files,
pre-processing; end to end with the tiny SynthPSG config when the model is available."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from PIL import Image
from torch import nn

from spade.config import add_spade_config
from spade.engine.predictor import SPADEPredictor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "synthetic", "spade_tiny_synthpsg.yaml")


def _load_demo():
    spec = importlib.util.spec_from_file_location(
        "spade_demo", os.path.join(ROOT, "projects", "SPADE", "demo.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


@pytest.fixture(scope="module")
def synthpsg_opts(tmp_path_factory):
    """Config options pointing SynthPSG at a small 64 x 64 copy shared by this module's tests."""
    root = tmp_path_factory.mktemp("synthpsg")
    return ["DATASETS.SYNTHPSG.ROOT", str(root), "DATASETS.SYNTHPSG.NUM_IMAGES", "8",
            "DATASETS.SYNTHPSG.IMAGE_SIZE", "64", "INPUT.IMAGE_SIZE", "64"]  # fmt: skip


def _write_png(path, h=24, w=32, value=0):
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = value, 255 - value
    Image.fromarray(rgb).save(path)


def test_expand_inputs_files_globs_folders(tmp_path):
    for name in ["b.png", "a.jpg", "c.txt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.PNG").write_bytes(b"x")
    t = str(tmp_path)
    assert demo.expand_inputs([t]) == [f"{t}/a.jpg", f"{t}/b.png"]  # folder: images, sorted
    assert demo.expand_inputs([f"{t}/*.png", f"{t}/sub/d.PNG"]) == [f"{t}/b.png", f"{t}/sub/d.PNG"]
    assert demo.expand_inputs([f"{t}/b.png", t]) == [f"{t}/b.png", f"{t}/a.jpg"]  # each once
    with pytest.raises(FileNotFoundError, match="nothere.jpg does not exist"):
        demo.expand_inputs([f"{t}/a.jpg", f"{t}/nothere.jpg"])
    with pytest.raises(FileNotFoundError, match=r"\*.bmp matches no file"):
        demo.expand_inputs([f"{t}/*.bmp"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no images"):
        demo.expand_inputs([f"{t}/empty"])


def test_output_stems_never_collide():
    paths = ["x/photo.jpg", "y/photo.png", "z/photo.png", "photo_2.png"]
    assert demo.output_stems(paths) == ["photo", "photo_2", "photo_3", "photo_2_2"]


def test_parse_vocabulary(tmp_path):
    assert demo.parse_vocabulary(None, "--classes") is None
    assert demo.parse_vocabulary(" cat, sofa ,,floor ", "--classes") == ["cat", "sofa", "floor"]
    f = tmp_path / "preds.txt"
    f.write_text("# predicates\non\n\nnext to\n")
    assert demo.parse_vocabulary("@" + str(f), "--predicates") == ["on", "next to"]
    with pytest.raises(ValueError, match="is a file; write @"):
        demo.parse_vocabulary(str(f), "--predicates")
    with pytest.raises(ValueError, match="--classes: no names"):
        demo.parse_vocabulary(" , ", "--classes")
    with pytest.raises(ValueError, match=r"--predicates: names given twice .*\['on'\]"):
        demo.parse_vocabulary("on,under,on", "--predicates")


class _HalvesModel(nn.Module):
    """Stub SPADE model: left half segment 1 (class 0), right half segment 2 (class 1), one triplet
    (1, 2, predicate 0); records its inputs."""

    def __init__(self):
        super().__init__()
        self.inputs = []
        self.vocabularies = []

    def set_vocabulary(self, class_names, predicate_names):
        self.vocabularies.append((class_names, predicate_names))

    def forward(self, batched_inputs):
        self.inputs.extend(batched_inputs)
        out = []
        for x in batched_inputs:
            seg = torch.ones(x["height"], x["width"], dtype=torch.int32)
            seg[:, x["width"] // 2 :] = 2
            info = [
                {"id": 1, "category_id": 0, "isthing": True, "score": 0.9},
                {"id": 2, "category_id": 1, "isthing": False, "score": 0.8},
            ]
            relations = {
                "triplets": torch.tensor([[1, 2, 0]]),
                "scores": torch.tensor([0.7]),
                "predicate_scores": torch.tensor([[0.7, 0.3]]),
            }
            out.append({"panoptic_seg": (seg, info), "relations": relations})
        return out


def _cfg(**updates):
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.MODEL.WEIGHTS = ""
    cfg.INPUT.FORMAT = "RGB"  # as Base-SPADE.yaml
    cfg.INPUT.IMAGE_SIZE = 64  # the test mapper fits images into 64 x 64
    cfg.MODEL.SPADE.OPEN_VOCAB.CLASS_NAMES = ["disc", "sky"]
    cfg.MODEL.SPADE.OPEN_VOCAB.PREDICATE_NAMES = ["below", "above"]
    cfg.merge_from_list([x for kv in updates.items() for x in kv])
    return cfg


def test_predictor_resizes_converts_and_names():
    model = _HalvesModel()
    predictor = SPADEPredictor(_cfg(), model=model)
    bgr = np.zeros((24, 32, 3), np.uint8)
    bgr[..., 0] = 200  # blue in BGR order
    out = predictor(bgr)
    x = model.inputs[-1]
    assert (x["height"], x["width"]) == (24, 32) and x["image"].shape == (3, 48, 64)
    assert x["image"].dtype == torch.uint8
    assert x["image"][2].float().mean() == 200 and x["image"][0].max() == 0  # RGB for the model
    predictor(bgr[:, :, ::-1].copy(), format="RGB")
    assert torch.equal(model.inputs[-1]["image"], x["image"])
    assert out["panoptic_seg"][0].shape == (24, 32)
    assert predictor.class_names == ["disc", "sky"]
    predictor.set_vocabulary(["cat", "sofa"], None)
    assert model.vocabularies == [(["cat", "sofa"], None)]
    assert predictor.class_names == ["cat", "sofa"] and predictor.predicate_names == [
        "below",
        "above",
    ]
    with pytest.raises(ValueError, match="duplicated class names"):
        predictor.set_vocabulary(["cat", "cat"], None)
    with pytest.raises(ValueError, match="expected an \\[H, W, 3\\] image"):
        predictor(np.zeros((4, 4), np.uint8))


def test_predictor_errors():
    with pytest.raises(
        FileNotFoundError, match="MODEL.WEIGHTS: checkpoint file /no/such.safetensors"
    ):
        SPADEPredictor(_cfg(**{"MODEL.WEIGHTS": "/no/such.safetensors"}), model=_HalvesModel())
    fixed = SPADEPredictor(_cfg(), model=nn.Identity())
    with pytest.raises(TypeError, match="Identity has no set_vocabulary"):
        fixed.set_vocabulary(["a"], ["b"])
    bare = _cfg(**{"MODEL.SPADE.OPEN_VOCAB.CLASS_NAMES": []})
    with pytest.raises(ValueError, match="no class names"):
        SPADEPredictor(bare, model=_HalvesModel()).class_names


def test_run_demo_writes_outputs_per_image(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _write_png(inputs / "one.png")
    _write_png(inputs / "two.png", h=30, w=20, value=90)
    (inputs / "broken.png").write_bytes(b"not a png")
    predictor = SPADEPredictor(_cfg(), model=_HalvesModel())
    out = tmp_path / "out"
    paths = demo.expand_inputs([str(inputs / "one.png"), str(inputs / "two.png")])
    written = demo.run_demo(predictor, paths, str(out), top_k_relations=5)
    assert len(written) == 2
    assert sorted(os.listdir(out)) == sorted(
        f"{s}_{k}" for s in ("one", "two") for k in ("graph.png", "panoptic.png", "triplets.json")
    )
    data = json.load(open(out / "two_triplets.json"))
    assert (data["height"], data["width"], data["file_name"]) == (30, 20, paths[1])
    assert data["triplets"][0]["subject"] == "disc" and data["triplets"][0]["object"] == "sky"
    assert Image.open(out / "two_graph.png").size == (20 * 20, 30 * 20)  # 20 * 20 >= 384
    assert demo.run_demo(predictor, paths[:1], str(out), confidence_threshold=0.8)
    assert json.load(open(out / "one_triplets.json"))["triplets"] == []
    with pytest.raises(OSError, match="cannot read image .*broken.png"):
        demo.run_demo(predictor, [str(inputs / "broken.png")], str(out))


def test_demo_end_to_end_on_synthpsg_and_a_photograph(tmp_path, monkeypatch, synthpsg_opts):
    from skimage import data as skdata

    from spade.data.synthpsg import generate_image
    from spade.modeling.meta_arch import SPADE

    # random weights mostly answer "no object": zero that column so that segments and triplets
    # exist and their plumbing into the outputs is checked. How many segments an untrained head
    # keeps depends on its seed and on the frozen backbone's features: SEED 2 keeps several on
    # both images with the shipped UNet (SEED 0 and 1 keep one segment, hence no pair, on one)
    class_probabilities = SPADE.class_probabilities

    def never_no_object(self, outputs, clip_features, images=None):
        probs = class_probabilities(self, outputs, clip_features, images).clone()
        probs[..., -1] = 0.0
        return probs

    monkeypatch.setattr(SPADE, "class_probabilities", never_no_object)

    rgb, _, _ = generate_image(seed=3, index=0, size=64)
    synth_png = tmp_path / "synth.png"
    Image.fromarray(rgb).save(synth_png)
    photo = tmp_path / "coffee.png"
    Image.fromarray(skdata.coffee()[::4, ::4]).save(photo)
    out = tmp_path / "out"
    written = demo.main(
        ["--config-file", TINY_CONFIG, "--input", str(synth_png), str(photo), "--output", str(out),
         "--top-k-relations", "10", "--classes", "cup,saucer,table,disc,ball",
         "--predicates", "on,next to,left of",
         "--opts", "MODEL.WEIGHTS", "", "MODEL.SPADE.ALLOW_UNTRAINED", "True",
         "MODEL.DEVICE", "cpu",
         "MODEL.SPADE.TEST.OVERLAP_THRESHOLD", "0.0",
         "MODEL.SPADE.TEST.OBJECT_MASK_THRESHOLD", "0.0", "SEED", "2",
         "MODEL.SPADE.RELATION.NUM_PAIRS", "1000"] + synthpsg_opts
    )  # fmt: skip
    assert len(written) == 2
    for stem, (h, w) in (("synth", (64, 64)), ("coffee", (100, 150))):
        data = json.load(open(out / f"{stem}_triplets.json"))
        assert (data["height"], data["width"]) == (h, w)
        ids = {s["id"] for s in data["segments"]}
        assert len(data["segments"]) > 0 and 0 < len(data["triplets"]) <= 10
        assert {s["category"] for s in data["segments"]} <= {
            "cup",
            "saucer",
            "table",
            "disc",
            "ball",
        }
        assert {t["predicate"] for t in data["triplets"]} <= {"on", "next to", "left of"}
        assert [t["rank"] for t in data["triplets"]] == list(range(1, len(data["triplets"]) + 1))
        assert all(t["subject_id"] in ids and t["object_id"] in ids for t in data["triplets"])
        assert (out / f"{stem}_panoptic.png").is_file() and (out / f"{stem}_graph.png").is_file()


def test_demo_command_line_runs_in_a_fresh_process(tmp_path, synthpsg_opts):
    """The script as users run it: registration through ``import spade``, argv parsing, outputs
    (random weights: any number of segments, possibly none)."""
    import subprocess
    import sys

    from spade.data.synthpsg import generate_image

    Image.fromarray(generate_image(seed=5, index=1, size=64)[0]).save(tmp_path / "s.png")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "projects", "SPADE", "demo.py"),
        "--config-file",
        TINY_CONFIG,
        "--input",
        str(tmp_path / "s.png"),
        "--output",
        str(tmp_path / "out"),
        "--opts",
        "MODEL.WEIGHTS",
        "",
        "MODEL.SPADE.ALLOW_UNTRAINED",
        "True",
    ]
    cmd += synthpsg_opts
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.load(open(tmp_path / "out" / "s_triplets.json"))
    assert (data["height"], data["width"]) == (64, 64)
    ids = {s["id"] for s in data["segments"]}
    assert all(t["subject_id"] in ids and t["object_id"] in ids for t in data["triplets"])
    assert Image.open(tmp_path / "out" / "s_panoptic.png").size == (64 * 6 + 360, 64 * 6)
    assert Image.open(tmp_path / "out" / "s_graph.png").size == (64 * 6, 64 * 6)
    missing = subprocess.run(cmd[:5] + [str(tmp_path / "nope.png")] + cmd[6:], cwd=str(tmp_path),
                             env=env, capture_output=True, text=True)  # fmt: skip
    assert missing.returncode != 0 and "nope.png does not exist" in missing.stderr
    untrained = subprocess.run(cmd[:-len(synthpsg_opts) - 2] + synthpsg_opts, cwd=str(tmp_path),
                               env=env, capture_output=True, text=True)  # fmt: skip
    assert untrained.returncode == 2 and "MODEL.WEIGHTS is empty" in untrained.stderr


def test_predictor_loads_weights_saved_by_the_checkpointer(tmp_path, synthpsg_opts):
    import argparse

    from spade.engine.checkpoint import SafetensorsCheckpointer
    from spade.engine.defaults import setup_cfg

    opts = ["MODEL.WEIGHTS", "", "MODEL.SPADE.ALLOW_UNTRAINED", "True"] + synthpsg_opts
    cfg = setup_cfg(argparse.Namespace(config_file=TINY_CONFIG, opts=opts), do_default_setup=False)
    trained = SPADEPredictor(cfg).model
    name, param = next((n, p) for n, p in trained.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param.add_(0.25)  # stands for training
    SafetensorsCheckpointer(trained, save_dir=str(tmp_path)).save("model_final")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(tmp_path / "model_final.safetensors")
    loaded = SPADEPredictor(cfg).model
    assert torch.equal(dict(loaded.named_parameters())[name], param)
    assert loaded.training is False
    cfg.MODEL.SPADE.ALLOW_UNTRAINED = False
    cfg.MODEL.WEIGHTS = ""
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        SPADEPredictor(cfg)


def test_run_demo_settings_pick_their_own_configs_and_val_split():
    spec = importlib.util.spec_from_file_location(
        "spade_run_demo", os.path.join(ROOT, "tools", "run_demo.py")
    )
    run_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_demo)
    calib, stage2, val = run_demo.setting_configs("closed")
    assert (calib, stage2, val) == (run_demo.CALIB_CONFIG, TINY_CONFIG, "synthpsg_val")
    for setting in ("ovr", "ovd", "ovdr"):
        calib, stage2, val = run_demo.setting_configs(setting)
        assert val == f"synthpsg_val_{setting}"
        for path in (calib, stage2):
            cfg = get_cfg()
            add_spade_config(cfg)
            cfg.merge_from_file(path)
            # each stage trains on the setting's own training split (no novel name)
            assert cfg.DATASETS.TRAIN == (f"synthpsg_train_{setting}",)
        assert cfg.DATASETS.TEST == (val,)
    with pytest.raises(ValueError, match="--setting"):
        run_demo.setting_configs("ov")
