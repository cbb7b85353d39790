#!/usr/bin/env python
"""Stage 1 of SPADE: inversion-guided calibration of LoRA + the implicit-text MLP adapter.

Examples::

    python projects/SPADE/calibrate_net.py --config-file configs/calibration/SynthPSG-Tiny.yaml
    python projects/SPADE/calibrate_net.py --config-file ... --num-gpus 2   # (GLOO on CPU)
    python projects/SPADE/calibrate_net.py --config-file ... --resume
    python projects/SPADE/calibrate_net.py --config-file ... --eval-only \
        MODEL.WEIGHTS output/calibration/synthpsg_tiny/model_final.safetensors

The output ``<OUTPUT_DIR>/model_final.safetensors`` is what stage 2 loads through
MODEL.SPADE.DIFFUSION.CALIBRATED_WEIGHTS; teacher/student map figures go to
``<OUTPUT_DIR>/visualization/``.
"""

import functools
import logging
import os

from detectron2.utils import comm

from spade.calibration.trainer import CalibrationTrainer
from spade.calibration.visualize import draw_dataset_examples
from spade.engine.defaults import argument_parser, run_cli, setup_cfg
from spade.engine.launch import launch_main

logger = logging.getLogger("spade.calibration")


def setup(args):
    """Config (defaults + YAML + opts, CPU fallback), logging, seeds, SynthPSG when used."""
    return setup_cfg(args)


def main(args):
    """Train (or with ``--eval-only`` evaluate) the calibration; returns the held-out result."""
    cfg = setup(args)
    if not cfg.CALIBRATION.ENABLED:
        logger.info("CALIBRATION.ENABLED is False: nothing to train (stage 2 uses the plain UNet)")
        return {}
    trainer = CalibrationTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if args.eval_only:
        result = trainer.evaluate() if trainer.eval_items else {}
    else:
        trainer.train()  # the EvalHook computes the held-out L_cal after the last iteration
        result = trainer.last_eval
    if comm.is_main_process() and cfg.CALIBRATION.NUM_VIS_IMAGES > 0:
        out_dir = os.path.join(cfg.OUTPUT_DIR, "visualization")
        for path in draw_dataset_examples(trainer, out_dir, cfg.CALIBRATION.NUM_VIS_IMAGES):
            logger.info("Wrote %s", path)
    return result


if __name__ == "__main__":
    args = argument_parser(epilog=__doc__).parse_args()
    print("Command Line Args:", args)
    # bad input in any process: one line on stderr, exit 2 (--debug: traceback)
    run_cli(functools.partial(launch_main, main), args)
