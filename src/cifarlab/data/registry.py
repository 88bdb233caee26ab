"""The data layer's registry: :class:`RawData` (a decoded data set), :class:`Source` (a resolved ``--data``
value) and :func:`register_source`. Imports no other data module, so that every source module can
register itself here and :mod:`.sources` can import them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import DataError

if TYPE_CHECKING:
    from ..config import DataConfig

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class RawData:
    """A decoded data set: uint8 images (N, H, W, 3) and int64 labels per split.

    ``val_x``/``val_y`` are set when the source gives a validation split of its own (``train/ val/ test/``),
    ``test_x``/``test_y`` are None when it gives no test split (``ROOT/<class>/*``): one is then carved from
    the training images (see :func:`cifarlab.data.dataset.plan_splits`). The arrays may be read-only memory
    maps of the decode cache.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    classes: list[str]
    source: str
    skipped: int = 0  # unreadable images skipped with --skip-bad-images
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None
    info: dict = field(default_factory=dict)  # layout, image sizes found: shown by `cifarlab data`

    def splits(self) -> list[str]:
        return [s for s in ("train", "val", "test") if getattr(self, f"{s}_x") is not None]

    def check(self) -> "RawData":
        if len(self.classes) < 2:
            raise DataError(f"{self.source}: a classifier needs at least 2 classes, found "
                            f"{len(self.classes)} ({', '.join(self.classes) or 'none'})")
        for name in self.splits():
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


@dataclass(frozen=True)
class Source:
    """A resolved ``--data`` value: what it is (``kind``), where, and how to decode it."""

    kind: str  # 'named', 'archive', 'folder', 'labels', 'download'
    path: Path | None
    load: Callable[["DataConfig"], RawData]
    name: str = ""  # a named data set's name


# A resolver returns a Source for a spec it reads, None for one it does not; ``spec`` is the --data value
# (None: $CIFARLAB_DATA unset) and ``cfg`` the data section (for data.labels).
Resolver = Callable[[str | None, "DataConfig"], Source | None]
_RESOLVERS: list[tuple[str, Resolver]] = []


def register_source(kind: str) -> Callable[[Resolver], Resolver]:
    def deco(fn: Resolver) -> Resolver:
        _RESOLVERS.append((kind, fn))
        return fn

    return deco


def resolvers() -> list[tuple[str, Resolver]]:
    """The registered resolvers, in registration order (:func:`cifarlab.data.sources.find_source` asks them)."""
    return list(_RESOLVERS)
