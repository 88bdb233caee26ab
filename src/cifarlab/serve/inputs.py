"""Uploaded bytes -> the model's uint8 image, or a clear client error.

Every way an upload can be wrong ends in :class:`InputError` (an HTTP status, a stable code and one line), never
in an exception that escapes the request. The pixel limit is checked on the image's header, before a single pixel
is decoded: a small file can declare a huge image (a decompression bomb: a PNG of 10,000 x 10,000 pixels of one
colour is a few kB and would take 300 MB to decode). The conversion after decoding is ``cifarlab predict``'s
(:func:`cifarlab.pixels.to_rgb_array`: transparency on black, grayscale and palette to RGB, bicubic resize),
so the server scores an image as ``predict`` and ``evaluate`` do. That module imports no PyTorch (500 MB of
resident memory in every worker of a server that runs an ONNX file without it), nor does this one.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..pixels import to_rgb_array


# Raster formats only (the extensions cifarlab reads from folders). Pillow would also open EPS, whose decoding runs
# Ghostscript, and a dozen formats nobody sends to a classifier: each is attack surface, none is needed.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # JPEG covers the MPO files of phone cameras
SIGNATURES = [(b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
              (b"RIFF", "WebP"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")]


class InputError(Exception):
    """A request the client must change: ``status`` (4xx), ``code`` (stable, for programs) and a message."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def decode(data: bytes, size: int, max_pixels: int, name: str = "image") -> np.ndarray:
    """One uploaded file as (size, size, 3) uint8 RGB."""
    if not data:
        raise InputError(400, "empty_image", f"{name} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns past 89 megapixels and raises past twice that; both are refusals here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(422, "too_many_pixels", f"{name}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        fmt = next((f for magic, f in SIGNATURES if data.startswith(magic)), None)
        if fmt is not None:  # its first bytes say what it is, yet its header cannot be read
            raise InputError(422, "bad_image", f"{name} starts like a {fmt} file but its header cannot be read: "
                             f"damaged or cut short") from None
        raise InputError(422, "not_an_image", f"{name} is not an image in a format this server reads (JPEG, PNG, "
                         f"WebP, GIF, BMP, TIFF, PPM/PGM)") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise InputError(422, "too_many_pixels", f"{name} is {w} x {h} = {w * h:,} pixels, over this server's "
                             f"limit of {max_pixels:,} (--max-pixels); it was not decoded")
        if w < 1 or h < 1:
            raise InputError(422, "not_an_image", f"{name} has no pixels ({w} x {h})")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message="Truncated File Read")  # a cut-off TIFF only warns
                im.load()
                return to_rgb_array(im, size)
        except (OSError, ValueError, SyntaxError, EOFError, UserWarning, Image.DecompressionBombError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            code = "truncated_image" if "truncat" in reason.lower() or isinstance(e, EOFError) else "bad_image"
            raise InputError(422, code, f"{name} cannot be decoded: {reason}") from None
