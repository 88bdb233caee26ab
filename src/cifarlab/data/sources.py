"""Where images come from: a registry of sources, each turning a ``--data`` value into :class:`RawData`.

A source is a :class:`Source` registered with :func:`register_source`: ``matches(spec)`` says whether
it reads a ``--data`` value (a known data set name, an archive, a folder layout, a labels file) and
``load(cfg)`` decodes it. :func:`find_source` asks them in registration order, so the data layer is a
table rather than an if-chain; adding a source is one module that registers itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError
from . import archive, folder, labels, named  # noqa: F401  (importing a source module registers it)
from .named import NAMED
from .registry import Source, resolvers

if TYPE_CHECKING:
    from ..config import DataConfig


def find_source(cfg: "DataConfig") -> Source:
    """The source for ``cfg.path`` (default ``$CIFARLAB_DATA``, else CIFAR-10 downloaded into the cache)."""
    spec = cfg.path or os.environ.get("CIFARLAB_DATA") or None
    for _, resolve in resolvers():
        src = resolve(spec, cfg)
        if src is not None:
            return src
    p = Path(str(spec)).expanduser()
    if not p.exists():
        raise DataError(f"data path not found: {p} (pass --data PATH: an image folder, a labels file's folder with "
                        f"--labels, a named set's official archive or its extracted folder, or a data set name: "
                        f"{', '.join(NAMED)})")
    if p.is_dir() and not any(p.iterdir()):
        raise DataError(f"data folder is empty: {p}")
    raise DataError(f"{p} is neither an image folder (ROOT/<class>/*, ROOT/train/<class>/*, ...) nor a named "
                    f"set's official archive or extracted folder; see the layout table in README.md")
