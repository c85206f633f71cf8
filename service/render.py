"""Rendering inputs as images: 8-bit gray levels and grayscale PNGs (for the dashboard and the examples API).

Pixel scaling (:func:`to_gray8`): an input whose values all lie in [0, 1] maps linearly, 0 -> black and
1 -> white, so that every example of an index is drawn on the same scale; any other input is min-max
scaled per image (its minimum black, its maximum white; a constant image is black).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["DEFAULT_SCALE", "MAX_SCALE", "to_gray8", "render_png"]

DEFAULT_SCALE = 4
"""Default nearest-neighbour upscaling factor of a rendering (28 x 28 digits become 112 x 112)."""

MAX_SCALE = 16
"""Largest upscaling factor a request may ask for."""


def to_gray8(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Map an input to 8-bit gray levels (see the module docstring for the two scalings).

    Args:
        values: `(height, width)` input values, any real dtype.

    Returns:
        ``(pixels, scaling)``: `(height, width)` uint8 gray levels and ``"unit"`` or ``"minmax"``.
    """
    x = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if x.size == 0 or (x.min() >= 0.0 and x.max() <= 1.0):
        return np.rint(x * 255.0).astype(np.uint8), "unit"
    lo, hi = float(x.min()), float(x.max())
    scaled = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return np.rint(scaled * 255.0).astype(np.uint8), "minmax"


def render_png(
    values: np.ndarray, image_shape: tuple[int, int], scale: int = DEFAULT_SCALE
) -> tuple[bytes, str]:
    """Render one input as a grayscale PNG, upscaled by ``scale`` with nearest-neighbour resampling.

    Args:
        values: the input, any shape with ``height * width`` elements (e.g. `(784,)` for a 28 x 28 digit).
        image_shape: ``(height, width)``.
        scale: upscaling factor, at least 1; each input value becomes a ``scale x scale`` block.

    Returns:
        ``(png, scaling)``: the PNG bytes (mode ``L``, ``(height * scale, width * scale)`` pixels) and the
        scaling used by :func:`to_gray8`.

    Raises:
        ValueError: ``values`` does not have ``height * width`` elements, or ``scale < 1``.
    """
    height, width = image_shape
    if scale < 1:
        raise ValueError(f"scale must be at least 1; got {scale}")
    x = np.asarray(values)
    if x.size != height * width:
        raise ValueError(f"an input of {x.size} values cannot be drawn as a {height} x {width} image")
    pixels, scaling = to_gray8(x.reshape(height, width))
    image = Image.fromarray(pixels)  # 2-D uint8: mode "L"
    if scale > 1:
        image = image.resize((width * scale, height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue(), scaling
