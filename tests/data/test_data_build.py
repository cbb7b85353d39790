"""Loaders: prepare_synthpsg + build_spade_train_loader / build_spade_test_loader on SynthPSG."""

import os

import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from spade.config import add_spade_config
from spade.data import build_spade_test_loader, build_spade_train_loader, prepare_synthpsg
from spade.data.datasets import synthpsg_dataset_names
from spade.data.datasets.builtin import register_all_synthpsg


def _cfg(root):
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("synthpsg_train",), ("synthpsg_val",)
    cfg.DATASETS.SYNTHPSG.ROOT, cfg.DATASETS.SYNTHPSG.NUM_IMAGES = root, 30
    cfg.DATASETS.SYNTHPSG.SEED = 3
    cfg.INPUT.IMAGE_SIZE, cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS = 64, 2, 0
    return cfg


def test_train_and_test_loaders(synth_root):
    cfg = _cfg(synth_root)
    try:
        assert prepare_synthpsg(cfg) == synth_root
        assert MetadataCatalog.get("synthpsg_train").json_file == os.path.join(
            os.path.abspath(synth_root), "psg.json"
        )
        batch = next(iter(build_spade_train_loader(cfg)))
        assert len(batch) == 2
        for x in batch:
            inst, rels = x["instances"], x["gt_relations"]
            assert x["image"].dtype == torch.uint8 and max(x["image"].shape[1:]) <= 64
            assert inst.gt_masks.shape[1:] == x["image"].shape[1:]
            assert int(inst.gt_masks.sum(0).max()) <= 1
            assert (inst.gt_masks.flatten(1).sum(1) >= cfg.INPUT.CROP.MIN_KEEP_AREA).all()
            assert rels.shape[1] == 3 and (rels[:, :2] < len(inst)).all()
        val = list(build_spade_test_loader(cfg, "synthpsg_val"))
        assert len(val) == 3 and val[0][0]["image"].shape[1:] == (64, 64)
        assert val[0][0]["height"] == 128
    finally:
        for n in synthpsg_dataset_names():
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)
        register_all_synthpsg()


def test_prepare_ignores_other_datasets(tmp_path):
    cfg = _cfg(str(tmp_path / "never"))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("psg_train",), ()
    assert prepare_synthpsg(cfg) == "" and not (tmp_path / "never").exists()
