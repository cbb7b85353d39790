#!/usr/bin/env python
"""SPADE demo: panoptic scene graphs of your own images, the detectron2 way.

    python projects/SPADE/demo.py --config-file configs/synthetic/spade_tiny_synthpsg.yaml \\
        --input photo.jpg "shots/*.png" folder/ --output out/ \\
        --opts MODEL.WEIGHTS output/model_final.safetensors
    # open vocabulary at inference: a comma list, or @FILE with one name per line
    python projects/SPADE/demo.py --config-file CFG --input photo.jpg --output out/ \\
        --classes "cat,sofa,floor,wall" --predicates @predicates.txt

For each input image ``<stem>`` it writes into --output:
``<stem>_panoptic.png`` (panoptic overlay + the top triplets), ``<stem>_graph.png`` (the scene
graph: nodes coloured like their masks, labelled directed edges) and ``<stem>_triplets.json``
(segments and ranked triplets with names and scores). A folder input means the images directly in
it (.jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff); a glob is expanded and sorted. Images of any
PIL mode (16-bit, CMYK, palette, alpha) are converted to 8-bit RGB (spade.data.image_io). A bad
input (missing file, unreadable image, bad vocabulary or config) ends with one line on stderr and
exit status 2; --debug shows the traceback.
"""

import argparse
import glob
import logging
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence

import tqdm
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from spade.data.image_io import read_image  # noqa: E402
from spade.utils.visualizer import SceneGraphVisualizer  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
logger = logging.getLogger("spade.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="SPADE demo: panoptic scene graphs of images",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a config file")
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files, globs ('dir/*.jpg') or folders"
    )
    parser.add_argument("--output", required=True, help="folder the outputs are written to")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.0,
        help="minimum triplet score for a triplet to be drawn and written",
    )
    parser.add_argument(
        "--top-k-relations", type=int, default=20, help="draw and write at most this many triplets"
    )
    parser.add_argument(
        "--classes",
        default=None,
        help="object classes: comma-separated names, or @FILE (one name a line)",
    )
    parser.add_argument(
        "--predicates",
        default=None,
        help="predicates: comma-separated names, or @FILE (one name a line)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an input error"
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config options as KEY VALUE pairs, e.g. MODEL.WEIGHTS path MODEL.DEVICE cpu",
    )
    return parser


def expand_inputs(patterns: Iterable[str]) -> List[str]:
    """Image paths named by files, globs and folders, in the order given (a glob or a folder
    sorted), each once.

    Raises:
        FileNotFoundError: a path that does not exist, a glob that matches nothing, a folder
            without images (naming it).
    """
    paths: List[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f)
                for f in os.listdir(pattern)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(pattern, f))
            )
            if not found:
                raise FileNotFoundError(
                    f"--input folder {pattern} holds no images {IMAGE_EXTENSIONS}"
                )
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"--input pattern {pattern} matches no file")
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            raise FileNotFoundError(f"--input {pattern} does not exist")
        for p in found:
            if os.path.abspath(p) not in {os.path.abspath(q) for q in paths}:
                paths.append(p)
    return paths


def output_stems(paths: Sequence[str]) -> List[str]:
    """One output name per input: its file stem, with "_2", "_3", ... added to later inputs
    whose stem is already taken (so photo.jpg and other/photo.png do not overwrite each other)."""
    stems: List[str] = []
    for p in paths:
        base = os.path.splitext(os.path.basename(p))[0]
        stem, n = base, 1
        while stem in stems:
            n += 1
            stem = f"{base}_{n}"
        stems.append(stem)
    return stems


def parse_vocabulary(value: Optional[str], option: str) -> Optional[List[str]]:
    """Names from ``value``: ``@FILE`` (one name a line; blank lines and lines starting with '#'
    skipped) or a comma-separated list. None stays None.

    Raises:
        FileNotFoundError: ``@FILE`` that does not exist.
        ValueError: no names, a name given twice, a file that is not UTF-8 text, or a value that
            names an existing file without the ``@`` (naming the option).
    """
    if value is None:
        return None
    if value.startswith("@"):
        path = value[1:]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{option} {value}: file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                names = [line.strip() for line in f]
        except UnicodeDecodeError:
            raise ValueError(f"{option} {value}: file {path} is not UTF-8 text") from None
        names = [n for n in names if n and not n.startswith("#")]
        source = f"file {path}"
    elif os.path.isfile(value):
        raise ValueError(f"{option} {value!r} is a file; write @{value} to read names from it")
    else:
        names = [n.strip() for n in value.split(",") if n.strip()]
        source = repr(value)
    if not names:
        raise ValueError(f"{option}: no names in {source}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{option}: names given twice in {source}: {dup}")
    return names


def run_demo(
    predictor,
    paths: Sequence[str],
    output_dir: str,
    *,
    confidence_threshold: float = 0.0,
    top_k_relations: int = 20,
) -> List[Dict[str, str]]:
    """Run ``predictor`` (a :class:`~spade.engine.predictor.SPADEPredictor` or any callable with
    ``__call__(image, format)``, ``class_names`` and ``predicate_names``) on every image and
    write its three outputs; returns one {"panoptic", "graph", "json"} -> path dict per image."""
    visualizer = SceneGraphVisualizer(
        predictor.class_names, predictor.predicate_names, _class_colors(predictor)
    )
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for path, stem in tqdm.tqdm(
        list(zip(paths, output_stems(paths))), desc="SPADE demo", unit="image"
    ):
        image = read_image(path, format="RGB")  # OSError naming the file
        predictions = predictor(image, format="RGB")
        written.append(
            visualizer.save(
                image,
                predictions,
                output_dir,
                stem,
                top_k=top_k_relations,
                score_threshold=confidence_threshold,
                image_name=path,
            )
        )
    return written


def _class_colors(predictor) -> Optional[List]:
    """The test dataset's colours when the predictor still uses the dataset's own classes."""
    meta = getattr(predictor, "metadata", None)
    if meta is None:
        return None
    names = list(meta.get("thing_classes", []) or []) + list(meta.get("stuff_classes", []) or [])
    colors = list(meta.get("thing_colors", []) or []) + list(meta.get("stuff_colors", []) or [])
    if names == list(predictor.class_names) and len(colors) == len(names):
        return colors
    return None


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, str]]:
    """Run the demo; bad input exits with status 2 and one line on stderr (see module doc)."""
    from spade.engine.defaults import run_cli

    args = get_parser().parse_args(argv)
    return run_cli(_run, args, prog="demo.py")


def _run(args) -> List[Dict[str, str]]:
    setup_logger(name="spade")
    if args.top_k_relations < 0:
        raise ValueError(f"--top-k-relations must be >= 0, got {args.top_k_relations}")
    paths = expand_inputs(args.input)
    classes = parse_vocabulary(args.classes, "--classes")
    predicates = parse_vocabulary(args.predicates, "--predicates")

    from spade.engine.defaults import setup_cfg
    from spade.engine.predictor import SPADEPredictor

    cfg = setup_cfg(args, do_default_setup=False)
    predictor = SPADEPredictor(cfg)
    if classes is not None or predicates is not None:
        predictor.set_vocabulary(classes, predicates)
    written = run_demo(
        predictor,
        paths,
        args.output,
        confidence_threshold=args.confidence_threshold,
        top_k_relations=args.top_k_relations,
    )
    logger.info(f"wrote the outputs of {len(written)} images to {os.path.abspath(args.output)}")
    return written


if __name__ == "__main__":
    main()
