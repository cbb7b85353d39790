"""Reading user images of any PIL mode as 8-bit RGB (or BGR) arrays.

detectron2's ``read_image`` converts with ``Image.convert("RGB")``, which clips 16-bit and 32-bit
greyscale to 255 (a white image) and drops alpha without compositing. Here:

* ``I;16*`` / ``I`` (16- or 32-bit integer greyscale): scaled from the value range of the mode
  (16 bits -> 8 bits; ``I`` files with values above 255 are treated as 16-bit);
* ``F`` (float greyscale): values in [0, 1] are scaled to [0, 255], others clipped;
* modes with transparency (``RGBA``, ``LA``, ``PA``, palette images with a transparent colour)
  are composited over white;
* every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) goes through
  PIL's own conversion; EXIF orientation is applied as detectron2 does.

A missing or unreadable file is an ``OSError`` naming it.
"""

import numpy as np
from PIL import Image, ImageOps

__all__ = ["read_image", "pil_to_rgb"]


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] RGB array of a PIL image of any mode (see module doc)."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.float64)
        if mode == "I" and values.max(initial=0) <= 255:
            scale = 1.0
        else:
            scale = 255.0 / 65535.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if values.size and values.min() >= 0 and values.max() <= 1:
            values = values * 255.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def read_image(path: str, format: str = "RGB") -> np.ndarray:
    """uint8 [H, W, 3] array of the image file ``path`` in ``format`` ("RGB" or "BGR")."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            rgb = pil_to_rgb(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors on truncated / unknown files
        raise OSError(f"cannot read image {path}: {e}") from None
    if format == "BGR":
        return np.ascontiguousarray(rgb[:, :, ::-1])
    if format != "RGB":
        raise ValueError(f"image format must be RGB or BGR, got {format!r}")
    return np.ascontiguousarray(rgb)
