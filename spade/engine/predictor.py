"""SPADEPredictor: one image in, one SPADE model output out (detectron2's DefaultPredictor, for
SPADE).

Compared with calling the model directly it (1) builds the model from the config and loads
``cfg.MODEL.WEIGHTS`` with :class:`~spade.engine.checkpoint.SafetensorsCheckpointer` (safetensors,
or a weights-only ``.pth``; never a pickle): the stage-1 weights the checkpoint records are used
when the config names none, a checkpoint that does not fit the model is refused, and an empty
MODEL.WEIGHTS is an error unless MODEL.SPADE.ALLOW_UNTRAINED, (2) takes a numpy image in BGR or
RGB order and converts it to ``cfg.INPUT.FORMAT``, (3) applies the test-time resize of the
test dataset mapper (``INPUT.DATASET_MAPPER_NAME``; SPADE's fits the image into INPUT.IMAGE_SIZE),
so a demo image is seen exactly as an evaluation image is,
(4) runs one image under ``torch.no_grad`` and returns its output dict (docs/INTERFACES.md, "Model
output"), at the original image size.

    predictor = SPADEPredictor(cfg)
    predictor.set_vocabulary(["cat", "sofa", "floor"], ["on", "next to"])  # open vocabulary
    output = predictor(cv2.imread("input.jpg"))                            # BGR, like detectron2
"""

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from torch import nn

from spade.data.dataset_mapper import build_dataset_mapper
from spade.provenance import resolve_calibrated_weights

from .checkpoint import SafetensorsCheckpointer

__all__ = ["SPADEPredictor"]


class SPADEPredictor:
    """Single-image inference with a SPADE model built from ``cfg``.

    Attributes:
        cfg: a frozen copy of the config.
        model: the model, in eval mode.
        metadata: ``MetadataCatalog.get(cfg.DATASETS.TEST[0])`` (None without a test dataset).
    """

    def __init__(self, cfg: CfgNode, model: Optional[nn.Module] = None):
        """
        Args:
            cfg: a SPADE config (``add_spade_config`` + YAML + opts).
            model: an already built model to use instead of ``build_model(cfg)`` (the weights of
                ``cfg.MODEL.WEIGHTS``, when set, are still loaded into it).
        """
        weights = cfg.MODEL.WEIGHTS
        if model is None:
            if not weights and not cfg.MODEL.SPADE.ALLOW_UNTRAINED:
                raise ValueError(
                    "MODEL.WEIGHTS is empty: the predictor would run untrained heads; name a "
                    "stage-2 checkpoint, or set MODEL.SPADE.ALLOW_UNTRAINED True"
                )
            if weights and "://" not in weights and not os.path.isfile(weights):
                raise FileNotFoundError(f"MODEL.WEIGHTS: checkpoint file {weights} does not exist")
            cfg = resolve_calibrated_weights(cfg, weights)
        self.cfg = cfg.clone()
        self.cfg.freeze()
        self.model = model if model is not None else build_model(self.cfg)
        self.model.eval()
        self.metadata = (
            MetadataCatalog.get(cfg.DATASETS.TEST[0]) if len(cfg.DATASETS.TEST) else None
        )
        if weights:
            if "://" not in weights and not os.path.isfile(weights):
                raise FileNotFoundError(f"MODEL.WEIGHTS: checkpoint file {weights} does not exist")
            allow = bool(cfg.MODEL.SPADE.ALLOW_PARTIAL_CHECKPOINT)
            SafetensorsCheckpointer(self.model, allow_partial=allow).load(weights)
        mapper = build_dataset_mapper(self.cfg, is_train=False)
        self.aug = getattr(mapper, "augmentations", None)
        if not isinstance(self.aug, T.AugmentationList):
            raise TypeError(
                f"INPUT.DATASET_MAPPER_NAME {cfg.INPUT.DATASET_MAPPER_NAME!r}: the test mapper "
                "has no 'augmentations' AugmentationList to pre-process demo images with"
            )
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {cfg.INPUT.FORMAT!r}")
        self.input_format = cfg.INPUT.FORMAT
        self._class_names: Optional[List[str]] = None
        self._predicate_names: Optional[List[str]] = None

    def set_vocabulary(
        self,
        class_names: Optional[Sequence[str]] = None,
        predicate_names: Optional[Sequence[str]] = None,
    ) -> None:
        """Set the open vocabulary of the model (None keeps the current one) through the model's
        own ``set_vocabulary(class_names, predicate_names)``.

        Raises:
            TypeError: the model has no ``set_vocabulary`` (its vocabulary is fixed).
            ValueError: an empty or duplicated name.
        """
        for what, names in (("class", class_names), ("predicate", predicate_names)):
            if names is None:
                continue
            names = [str(n) for n in names]
            if not names or any(not n.strip() for n in names):
                raise ValueError(f"set_vocabulary: {what} names must be non-empty, got {names}")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"set_vocabulary: duplicated {what} names {dup}")
        fn = getattr(self.model, "set_vocabulary", None)
        if not callable(fn):
            raise TypeError(
                f"{type(self.model).__name__} has no set_vocabulary(): its vocabulary is fixed"
            )
        fn(
            list(class_names) if class_names is not None else None,
            list(predicate_names) if predicate_names is not None else None,
        )
        if class_names is not None:
            self._class_names = list(class_names)
        if predicate_names is not None:
            self._predicate_names = list(predicate_names)

    @property
    def class_names(self) -> List[str]:
        """Names indexed by the output's ``category_id``: the model's own vocabulary when it has
        one, else the last ``set_vocabulary``, ``MODEL.SPADE.OPEN_VOCAB.CLASS_NAMES``, the test
        dataset's ``thing_classes + stuff_classes``."""
        return self._names(
            "class_names", self._class_names, "CLASS_NAMES", ("thing_classes", "stuff_classes")
        )

    @property
    def predicate_names(self) -> List[str]:
        """Names indexed by the output's predicate column (same precedence as ``class_names``)."""
        return self._names(
            "predicate_names", self._predicate_names, "PREDICATE_NAMES", ("predicate_classes",)
        )

    def _names(
        self, attr: str, explicit: Optional[List[str]], cfg_key: str, meta_keys: Sequence[str]
    ) -> List[str]:
        vocabulary = getattr(self.model, "vocabulary", None)
        if vocabulary is not None and getattr(vocabulary, attr, None):
            return list(getattr(vocabulary, attr))
        if explicit is not None:
            return list(explicit)
        if self.cfg.MODEL.SPADE.OPEN_VOCAB.get(cfg_key):
            return list(self.cfg.MODEL.SPADE.OPEN_VOCAB.get(cfg_key))
        names: List[str] = []
        if self.metadata is not None:
            for key in meta_keys:
                names += list(self.metadata.get(key, []) or [])
        if not names:
            raise ValueError(
                f"no {attr.replace('_', ' ')}: the model has no vocabulary, none was set, "
                f"MODEL.SPADE.OPEN_VOCAB.{cfg_key} is empty and the metadata of "
                f"{list(self.cfg.DATASETS.TEST)} has no {'/'.join(meta_keys)}"
            )
        return names

    def __call__(self, image: np.ndarray, format: str = "BGR") -> Dict[str, Any]:
        """
        Args:
            image: uint8 [H, W, 3] numpy image.
            format: channel order of ``image``, "BGR" (as cv2.imread gives) or "RGB".
        Returns:
            the model output of this image (docs/INTERFACES.md), at size H x W.
        """
        if format not in ("RGB", "BGR"):
            raise ValueError(f"SPADEPredictor: format must be 'RGB' or 'BGR', got {format!r}")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(
                f"SPADEPredictor: expected an [H, W, 3] image, got shape {image.shape}"
            )
        if image.dtype != np.uint8:
            raise ValueError(f"SPADEPredictor: expected a uint8 image, got {image.dtype}")
        if format != self.input_format:
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.aug(aug_input)
        image = aug_input.image
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        with torch.no_grad():
            return self.model([{"image": tensor, "height": height, "width": width}])[0]
