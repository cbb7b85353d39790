"""The tiny SPADE model (TINY diffusion backbone, open-vocabulary cosine classifier, small head)
overfits 4 SynthPSG images: PQ on those images far above chance after 100 iterations on one CPU
core. And the instant config trains and evaluates through projects/SPADE/train_net.py."""

import importlib.util
import json
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

import spade.modeling  # noqa: F401  (registers SPADE, the backbone and the heads)
from spade.config import add_spade_config
from spade.data.dataset_mapper import build_dataset_mapper
from spade.data.datasets.builtin import register_all_synthpsg
from spade.data.datasets.synthetic import register_synthpsg
from spade.data.synthpsg import ensure_synthpsg
from spade.evaluation.panoptic import encode_panoptic_png, panoptic_quality

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(REPO, "configs", "synthetic", "spade_tiny_synthpsg.yaml")
INSTANT_CONFIG = os.path.join(REPO, "configs", "quick_schedules", "spade_instant_test.yaml")
PREFIX = "synthpsg_overfit"


def overfit_cfg(root):
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN",
            (f"{PREFIX}_train",),
            "DATASETS.TEST",
            (f"{PREFIX}_train",),
            "DATASETS.SYNTHPSG.ROOT",
            root,
            "MODEL.SPADE.RELATION.ENABLED",
            False,
            # the head's capacity needs no knowledge: the random TINY preset, not the shipped models
            "MODEL.SPADE.PRESET",
            "TINY",
            "MODEL.SPADE.DIFFUSION.PRETRAINED",
            "",
            "MODEL.SPADE.DIFFUSION.FEATURE_BLOCKS",
            ["up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"],
            "MODEL.SPADE.CLIP.MODEL_NAME",
            "TINY",
            "MODEL.SPADE.CLIP.PRETRAINED",
            "",
            "MODEL.SPADE.OPEN_VOCAB.USE_CLIP_BRANCH",  # the random TINY CLIP knows no classes
            False,
            # its text embeddings are nearly collinear: start at CLIP's largest temperature
            "MODEL.SPADE.OPEN_VOCAB.LOGIT_SCALE_INIT",
            4.6,
            "MODEL.SPADE.MASK_HEAD.NUM_OBJECT_QUERIES",
            12,
            "MODEL.SPADE.MASK_HEAD.DEC_LAYERS",
            3,
            "MODEL.SPADE.MASK_HEAD.TRAIN_NUM_POINTS",
            256,
            "MODEL.SPADE.PIXEL_DECODER.ENCODER_LAYERS",
            1,
            "MODEL.SPADE.TEST.OBJECT_MASK_THRESHOLD",
            0.5,
            "INPUT.IMAGE_SIZE",
            64,
            "INPUT.MIN_SCALE",
            1.0,
            "INPUT.MAX_SCALE",
            1.0,
            "INPUT.RANDOM_FLIP",
            "none",
        ]
    )
    return cfg


def panoptic_quality_of(model, cfg, dicts):
    mapper = build_dataset_mapper(cfg, is_train=False)
    preds = []
    model.eval()
    with torch.no_grad():
        for d in dicts:
            seg, segments = model([mapper(dict(d))])[0]["panoptic_seg"]
            png, kept = encode_panoptic_png(seg.numpy(), segments)
            preds.append({"image_id": d["image_id"], "png": png, "segments_info": kept})
    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    names = meta.thing_classes + meta.stuff_classes
    cats = [
        {"id": i, "name": n, "isthing": int(i < len(meta.thing_classes))}
        for i, n in enumerate(names)
    ]
    gts = [
        {
            "image_id": d["image_id"],
            "file_name": d["pan_seg_file_name"],
            "segments_info": d["segments_info"],
        }
        for d in dicts
    ]
    return panoptic_quality(gts, preds, cats)


@pytest.fixture(scope="module")
def synthpsg_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("overfit") / "synthpsg")
    ensure_synthpsg(root, num_images=8, seed=0, size=64)
    register_synthpsg(root, prefix=PREFIX)
    return root


def test_tiny_model_overfits_four_images(synthpsg_root):
    torch.manual_seed(0)
    cfg = overfit_cfg(synthpsg_root)
    model = build_model(cfg)
    dicts = DatasetCatalog.get(f"{PREFIX}_train")[:4]
    mapper = build_dataset_mapper(cfg, is_train=True)
    batch = [mapper(dict(d)) for d in dicts]
    before = panoptic_quality_of(model, cfg, dicts)["PQ"]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for _ in range(100):
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    result = panoptic_quality_of(model, cfg, dicts)
    assert before < 10.0  # an untrained model is near chance
    assert result["PQ"] > 60.0, result  # measured 89 (things 84, stuff 97)
    assert result["PQ_th"] > 40.0 and result["PQ_st"] > 40.0, result


def _load_train_net():
    path = os.path.join(REPO, "projects", "SPADE", "train_net.py")
    spec = importlib.util.spec_from_file_location("spade_train_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_instant_config_trains_and_evaluates_through_train_net(tmp_path):
    train_net = _load_train_net()
    out, root = str(tmp_path / "out"), str(tmp_path / "synthpsg")
    common = ["--config-file", INSTANT_CONFIG]
    opts = ["OUTPUT_DIR", out, "DATASETS.SYNTHPSG.ROOT", root]
    try:
        train_net.main(default_argument_parser().parse_args(common + opts))
        with open(f"{out}/metrics.json") as f:
            metrics = [json.loads(line) for line in f if "total_loss" in line]
        assert metrics[-1]["iteration"] == 39
        assert all(0 < m["total_loss"] < 1e4 for m in metrics)
        assert {"loss_ce", "loss_mask", "loss_dice", "loss_rel"} <= set(metrics[-1])
        weights = f"{out}/model_final.safetensors"
        args = default_argument_parser().parse_args(
            common + ["--eval-only"] + opts + ["MODEL.WEIGHTS", weights]
        )
        results = train_net.main(args)
    finally:
        register_all_synthpsg()  # restore the default synthpsg_* registrations
    pq = results["panoptic_seg"]["PQ"]
    assert 0.0 <= pq <= 100.0
    assert "R@50" in results["psg"]
