#!/usr/bin/env python
"""SPADE stage 2: train / evaluate the panoptic scene-graph model, the detectron2 way.

    python projects/SPADE/train_net.py --config-file configs/synthetic/spade_tiny_synthpsg.yaml
    python projects/SPADE/train_net.py --config-file CFG --eval-only \
        MODEL.WEIGHTS OUT/model_final.safetensors
    python projects/SPADE/train_net.py --config-file CFG --num-gpus 4   # one machine, 4 GPUs
    python projects/SPADE/train_net.py --config-file CFG --num-gpus 2   # no GPU: 2 CPU processes
    python projects/SPADE/train_net.py --config-file CFG --resume       # continue after a kill

The logic lives in tested modules (spade.engine, spade.data, spade.evaluation); the Trainer below
only picks SPADE's data loaders, evaluator and optimizer.
"""

import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from spade.data.build import build_spade_test_loader, build_spade_train_loader  # noqa: E402
from spade.engine import SPADETrainer, build_spade_optimizer  # noqa: E402
from spade.engine.defaults import argument_parser, run_cli, run_training, setup_cfg  # noqa: E402
from spade.engine.launch import launch_main  # noqa: E402
from spade.evaluation.psg_evaluation import PSGEvaluator  # noqa: E402


class Trainer(SPADETrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return build_spade_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_spade_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return PSGEvaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_spade_optimizer(cfg, model)


def main(args):
    cfg = setup_cfg(args)
    return run_training(Trainer, cfg, args)


if __name__ == "__main__":
    args = argument_parser(epilog=__doc__).parse_args()
    print("Command Line Args:", args)
    # bad input in any process: one line on stderr, exit 2 (--debug: traceback)
    run_cli(functools.partial(launch_main, main), args)
