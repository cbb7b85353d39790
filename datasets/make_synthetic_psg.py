"""Generate SynthPSG (the embedded PSG-format dataset); rules in spade/data/synthpsg.py.

Usage: python datasets/make_synthetic_psg.py --out datasets/synthpsg --num-images 600 --seed 0
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spade.data.synthpsg import ensure_synthpsg, generate_synthpsg  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=600, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument(
        "--long-tail",
        type=float,
        default=0.85,
        help="predicate sampling weight ratio per predicate index (1 = balanced)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into --out even when it already holds a dataset",
    )
    args = parser.parse_args(argv)
    if args.overwrite:
        info = generate_synthpsg(args.out, args.num_images, args.seed, args.size, args.long_tail)
        print(
            f"wrote {args.num_images} images to {args.out} in {info['seconds']:.1f} s "
            f"({info['cpu_seconds']:.1f} s CPU)"
        )
    else:
        ensure_synthpsg(args.out, args.num_images, args.seed, args.size, args.long_tail)
        print(f"SynthPSG ready in {args.out}")


if __name__ == "__main__":
    main()
