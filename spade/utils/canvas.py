"""Pixel-exact matplotlib rendering shared by SPADE's drawings (overlay, scene graph).

Figures are rendered off-screen with the Agg canvas at 72 dpi, so a font size in points is a size
in pixels and an H x W canvas comes back as exactly H x W pixels.
"""

import io
from typing import Any, Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .io import atomic_write_bytes
from .scene_graph_view import Color, SceneGraphView

__all__ = ["FONT", "display_scale", "text_color", "hex_color", "render", "check_image", "write_png"]

FONT = 11  # text size in pixels


def display_scale(height: int, width: int, min_display_side: int, max_display_side: int) -> int:
    """Integer upscaling factor s >= 1 so that s * min(H, W) >= min_display_side, unless that
    would make s * max(H, W) exceed max_display_side."""
    s = max(1, -(-min_display_side // max(1, min(height, width))))
    while s > 1 and s * max(height, width) > max_display_side:
        s -= 1
    return s


def text_color(color: Color) -> str:
    """ "black" or "white", whichever reads better on an RGB background ``color``."""
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return "black" if luminance > 140 else "white"


def hex_color(color: Color) -> str:
    """An RGB 0-255 tuple as "#rrggbb"."""
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in color))


def render(canvas: np.ndarray, draw: Callable[[Any], None]) -> np.ndarray:
    """Show ``canvas`` (uint8 [H, W, 3]) pixel for pixel in an exact H x W figure, let ``draw(ax)``
    add artists in pixel coordinates (x right, y down), and return the rendered uint8 [H, W, 3]."""
    h, w = canvas.shape[:2]
    fig = Figure(figsize=((w + 1e-2) / 72.0, (h + 1e-2) / 72.0), dpi=72)
    agg = FigureCanvasAgg(fig)
    ax = fig.add_axes([0.0, 0.0, 1.0, 1.0])
    ax.set_axis_off()
    ax.imshow(canvas, interpolation="nearest", extent=(0, w, h, 0))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    draw(ax)
    agg.draw()
    agg.draw()  # second pass: arrows clip against text boxes positioned by the first
    rgba = np.asarray(agg.buffer_rgba())
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    hh, ww = min(h, rgba.shape[0]), min(w, rgba.shape[1])
    out[:hh, :ww] = rgba[:hh, :ww, :3]
    return out


def check_image(image: np.ndarray, view: SceneGraphView) -> np.ndarray:
    """``image`` as uint8 [H, W, 3], or a ValueError naming the image when it does not match
    the view's panoptic map."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != view.seg.shape:
        raise ValueError(
            f"{view.image_name}: image must be RGB uint8 [H, W, 3] matching the panoptic map "
            f"{tuple(view.seg.shape)}, got {tuple(image.shape)}"
        )
    return image.astype(np.uint8)


def write_png(path: str, image: np.ndarray) -> None:
    """Encode uint8 [H, W, 3] RGB as PNG and write it atomically."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
