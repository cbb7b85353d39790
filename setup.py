#!/usr/bin/env python
"""SPADE: Spatial-Aware Denoising Network for open-vocabulary panoptic scene graph generation.

A detectron2 project extension. detectron2 itself is not on PyPI: ``tools/install_detectron2.sh``
installs it (``make install`` runs it), or install the official build from source first.
"""

from setuptools import find_packages, setup

setup(
    name="spade",
    version="0.1.0",
    description=(
        "SPADE: open-vocabulary panoptic scene graph generation with a calibrated diffusion UNet"
    ),
    packages=find_packages(include=["spade", "spade.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "numpy<2",
        "opencv-python-headless<4.11",
        "diffusers>=0.30",
        "peft>=0.10",
        "open_clip_torch>=2.23",
        "fvcore",
        "iopath",
        "panopticapi-lite",
        "scipy",
        "pycocotools",
        "h5py",
        "safetensors",
        "tqdm",
        "matplotlib",
        "Pillow",
    ],
    extras_require={"dev": ["pytest", "scikit-image", "tensorboard"]},
)
