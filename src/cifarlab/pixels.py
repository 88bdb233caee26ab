"""A decoded image as the model's pixels: any Pillow mode and size to (size, size, 3) uint8 RGB. Imports Pillow
and NumPy only, not PyTorch: the training folders (:mod:`cifarlab.data.folder`), ``predict`` and the server
(:mod:`cifarlab.serve.inputs`, whose ONNX workers run without PyTorch) all convert through this one function, so
an image is scored as it was trained."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb_array(im: Image.Image, size: int) -> np.ndarray:
    """A loaded Pillow image of any mode and size as (size, size, 3) uint8 RGB: transparency composited on black
    (like zeros), grayscale, palette and the rest converted to RGB, other sizes resized bicubic."""
    if im.mode != "RGB":
        if im.mode in ("RGBA", "LA", "P", "PA"):  # composite transparency on black, like zeros
            im = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im)
        im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)
