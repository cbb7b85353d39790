"""Set-up shared by SPADE's entry points (train_net.py, calibrate_net.py, demo.py).

- :func:`setup_cfg`: get_cfg + add_spade_config + the YAML + command-line opts, CPU fallback when
  no GPU exists, detectron2's default_setup (logger, config backup, seeds).
- :func:`prepare_datasets`: generates SynthPSG when a config names it and its folder is empty
  (main process only; the others wait), and registers it at the configured root; registers the
  dataset of ``DATASETS.CUSTOM`` (your own PSG-format data) in every process.
- :func:`run_training`: the usual detectron2 ``--eval-only`` / ``--resume`` / train flow.
- :func:`argument_parser` / :func:`run_cli`: detectron2's parser plus ``--debug``; bad input
  (a missing or malformed file, an unknown config key, a bad value) ends the command with one
  line ``<prog>: error: <message>`` on stderr and exit status 2, the traceback only with --debug.
"""

import logging
import os
import sys

import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from spade.config import add_spade_config, validate_spade_config
from spade.provenance import resolve_calibrated_weights

__all__ = [
    "setup_cfg",
    "merge_config",
    "prepare_datasets",
    "run_training",
    "eval_weights",
    "argument_parser",
    "run_cli",
]

logger = logging.getLogger(__name__)


def setup_cfg(args, *, freeze: bool = True, do_default_setup: bool = True) -> CfgNode:
    """Build the config from ``args.config_file`` and ``args.opts`` (detectron2 argument parser)."""
    import spade

    spade.register_all()  # datasets, backbone, meta-arch and heads

    cfg = get_cfg()
    add_spade_config(cfg)
    merge_config(cfg, getattr(args, "config_file", ""), list(getattr(args, "opts", []) or []))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if freeze:
        cfg.freeze()
    if do_default_setup:
        default_setup(cfg, args)  # logger, config backup, seeds (cfg.SEED)
        # SPADE's own loggers (spade.*) to the console and OUTPUT_DIR/log.txt, as detectron2's
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="spade")
    elif cfg.SEED >= 0:
        seed_all_rng(cfg.SEED)  # same seed, same randomly initialised parts
    prepare_datasets(cfg)
    return cfg


def merge_config(cfg: CfgNode, config_file: str = "", opts=()) -> CfgNode:
    """Merge a YAML and ``KEY VALUE`` opts into ``cfg``, then :func:`validate_spade_config`.

    Every problem is a ValueError / FileNotFoundError naming the file (or "command-line opts")
    and the key: a missing file, YAML syntax, an unknown key, a value of the wrong type.
    """
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"--config-file {config_file} does not exist")
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, TypeError, AssertionError, yaml.YAMLError) as e:
            raise ValueError(f"--config-file {config_file}: {_one_line(e)}") from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise ValueError(f"command-line opts: {_one_line(e)}") from None
    validate_spade_config(cfg)
    return cfg


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(msg).split()) or type(e).__name__


def argument_parser(epilog=None):
    """detectron2's default_argument_parser plus ``--debug`` (traceback on bad input)."""
    parser = default_argument_parser(epilog=epilog)
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an input error"
    )
    return parser


# errors that mean "the user gave us something wrong": files, keys, values
BAD_INPUT_ERRORS = (OSError, ValueError, KeyError, yaml.YAMLError)


def run_cli(fn, args, prog: str = ""):
    """Return ``fn(args)``; a bad-input error exits with status 2 and one line on stderr
    (``prog: error: message``), re-raised unchanged with ``args.debug``."""
    try:
        return fn(args)
    except BAD_INPUT_ERRORS as e:
        if getattr(args, "debug", False):
            raise
        prog = prog or os.path.basename(sys.argv[0])
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def eval_weights(cfg: CfgNode, resume: bool = False) -> str:
    """The checkpoint an evaluation loads: with ``resume`` the last one of OUTPUT_DIR when it
    exists, else MODEL.WEIGHTS. None at all is a ValueError unless MODEL.SPADE.ALLOW_UNTRAINED
    (then "" and the model runs with its random heads)."""
    tag = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    weights = cfg.MODEL.WEIGHTS
    if resume and os.path.isfile(tag):
        with open(tag) as f:
            name = f.read().strip()
        weights = os.path.join(cfg.OUTPUT_DIR, name)
        if not os.path.splitext(weights)[1] and os.path.isfile(weights + ".safetensors"):
            weights += ".safetensors"
    if not weights and not cfg.MODEL.SPADE.ALLOW_UNTRAINED:
        raise ValueError(
            "MODEL.WEIGHTS is empty: evaluation / inference would run untrained heads; name a "
            "stage-2 checkpoint, or set MODEL.SPADE.ALLOW_UNTRAINED True to run them anyway"
        )
    return weights


def prepare_datasets(cfg: CfgNode) -> None:
    """Generate (main process only; others wait) and register SynthPSG when the config uses it;
    register the ``DATASETS.CUSTOM`` dataset when the config names one."""
    from spade.data.build import prepare_synthpsg
    from spade.data.datasets.custom import register_custom_dataset

    register_custom_dataset(cfg)
    if comm.is_main_process():
        prepare_synthpsg(cfg)
    comm.synchronize()
    prepare_synthpsg(cfg)  # a complete dataset is only re-registered, in every process


def run_training(trainer_cls, cfg: CfgNode, args):
    """Evaluate (``--eval-only``) or train (``--resume`` continues the last checkpoint).

    ``--eval-only`` needs weights (MODEL.WEIGHTS, or with ``--resume`` the last checkpoint of
    OUTPUT_DIR) unless MODEL.SPADE.ALLOW_UNTRAINED; the stage-1 weights the checkpoint records
    are loaded when the config names none (spade.provenance.resolve_calibrated_weights)."""
    from spade.engine.checkpoint import SafetensorsCheckpointer

    if args.eval_only:
        weights = eval_weights(cfg, resume=args.resume)
        cfg = resolve_calibrated_weights(cfg, weights)
        model = trainer_cls.build_model(cfg)
        checkpointer = SafetensorsCheckpointer(
            model,
            save_dir=cfg.OUTPUT_DIR,
            allow_partial=bool(cfg.MODEL.SPADE.ALLOW_PARTIAL_CHECKPOINT),
        )
        if weights:
            checkpointer.load(weights)
        return trainer_cls.test(cfg, model)
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
