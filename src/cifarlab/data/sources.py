"""Where images come from: a registry of sources, each turning a ``--data`` value into :class:`RawData`.

A source is a :class:`Source` registered with :func:`register_source`: ``matches(spec)`` says whether
it reads a ``--data`` value (a known data set name, an archive, a folder layout, a labels file) and
``load(cfg)`` decodes it. :func:`find_source` asks them in registration order, so the data layer is a
table rather than an if-chain; adding a source is one module that registers itself.
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


# --------------------------------------------------------------------------- registry
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


def find_source(cfg: "DataConfig") -> Source:
    """The source for ``cfg.path`` (default ``$CIFARLAB_DATA``, else CIFAR-10 downloaded into the cache)."""
    from . import archive, folder, labels, named  # noqa: F401 - importing registers the sources

    spec = cfg.path or os.environ.get("CIFARLAB_DATA") or None
    for _, resolve in _RESOLVERS:
        src = resolve(spec, cfg)
        if src is not None:
            return src
    p = Path(str(spec)).expanduser()
    if not p.exists():
        from .named import NAMED

        raise DataError(f"data path not found: {p} (pass --data PATH: an image folder, a labels file's folder with "
                        f"--labels, cifar-10-python.tar.gz, or a data set name: {', '.join(NAMED)})")
    if p.is_dir() and not any(p.iterdir()):
        raise DataError(f"data folder is empty: {p}")
    raise DataError(f"{p} is neither an image folder (ROOT/<class>/*, ROOT/train/<class>/*, ...) nor a "
                    f"CIFAR-10 archive; see the layout table in README.md")
