"""Set-up shared by SPADE's entry points (train_net.py, calibrate_net.py, demo.py).

- :func:`setup_cfg`: get_cfg + add_spade_config + the YAML + command-line opts, CPU fallback when
  no GPU exists, detectron2's default_setup (logger, config backup, seeds).
- :func:`prepare_datasets`: generates SynthPSG when a config names it and its folder is empty
  (main process only; the others wait), and registers it at the configured root.
- :func:`run_training`: the usual detectron2 ``--eval-only`` / ``--resume`` / train flow.
"""

import logging
import os

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from spade.config import add_spade_config

__all__ = ["setup_cfg", "prepare_datasets", "run_training"]

logger = logging.getLogger(__name__)


def setup_cfg(args, *, freeze: bool = True, do_default_setup: bool = True) -> CfgNode:
    """Build the config from ``args.config_file`` and ``args.opts`` (detectron2 argument parser)."""
    import spade  # noqa: F401  (registers SPADE's datasets, backbone, meta-arch and heads)

    cfg = get_cfg()
    add_spade_config(cfg)
    if getattr(args, "config_file", ""):
        if not os.path.isfile(args.config_file):
            raise FileNotFoundError(f"--config-file {args.config_file} does not exist")
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(getattr(args, "opts", []) or []))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if freeze:
        cfg.freeze()
    if do_default_setup:
        default_setup(cfg, args)  # logger, config backup, seeds (cfg.SEED)
    elif cfg.SEED >= 0:
        seed_all_rng(cfg.SEED)  # same seed, same randomly initialised parts
    prepare_datasets(cfg)
    return cfg


def prepare_datasets(cfg: CfgNode) -> None:
    """Generate (main process only; others wait) and register SynthPSG when the config uses it."""
    from spade.data.build import prepare_synthpsg

    if comm.is_main_process():
        prepare_synthpsg(cfg)
    comm.synchronize()
    prepare_synthpsg(cfg)  # a complete dataset is only re-registered, in every process


def run_training(trainer_cls, cfg: CfgNode, args):
    """Evaluate (``--eval-only``) or train (``--resume`` continues the last checkpoint)."""
    from spade.engine.checkpoint import SafetensorsCheckpointer

    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        SafetensorsCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return trainer_cls.test(cfg, model)
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
