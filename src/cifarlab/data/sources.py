"""Where images come from: an image folder or the official CIFAR-10 archive."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class RawData:
    """A decoded data set: uint8 images (N, H, W, 3) and int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    source: str
    skipped: int = 0  # unreadable images skipped with --skip-bad-images

    def check(self) -> "RawData":
        for name in ("train", "test"):
            x, y = getattr(self, f"{name}_x"), getattr(self, f"{name}_y")
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y):
                raise DataError(f"{self.source}: {name} images must be (N, H, W, 3) uint8 with one label each")
            if len(x) == 0:
                raise DataError(f"{self.source}: the {name} split has no images")
            if y.min() < 0 or y.max() >= len(self.classes):
                raise DataError(f"{self.source}: {name} labels outside [0, {len(self.classes)})")
        return self


def cache_dir() -> Path:
    return Path(os.environ.get("CIFARLAB_CACHE") or Path.home() / ".cache" / "cifarlab")
