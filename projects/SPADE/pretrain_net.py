#!/usr/bin/env python
"""SPADE stage 0: pretrain the miniature foundation models (tiny CLIP, VAE, UNet), detectron2 style.

    python projects/SPADE/pretrain_net.py --config-file configs/pretrain/clip_tiny.yaml
    python projects/SPADE/pretrain_net.py --config-file configs/pretrain/vae_tiny.yaml --resume
    python projects/SPADE/pretrain_net.py --config-file configs/pretrain/unet_tiny.yaml --num-gpus 1
    python projects/SPADE/pretrain_net.py --config-file CFG --eval-only   # re-measure the gates

Each run exports its model in the format of the real one (open_clip hub folder, diffusers SD
folder) into PRETRAIN.EXPORT_DIR with a manifest holding the measured gates. `make pretrain`
runs all three. The logic lives in spade.pretrain.
"""

import os
import sys

from detectron2.engine import default_argument_parser, launch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from spade.pretrain import run_pretraining, setup_pretrain_cfg  # noqa: E402


def main(args):
    return run_pretraining(setup_pretrain_cfg(args), args)


if __name__ == "__main__":
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--skip-gates", action="store_true", help="export without measuring gates")
    args = parser.parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
