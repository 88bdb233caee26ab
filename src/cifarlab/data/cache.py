"""Decode once, then load in seconds: uint8 arrays cached beside a fingerprint.

The fingerprint hashes the source's file list with sizes and modification
times (and the decode settings), so a changed source rebuilds the cache.
Writes are atomic: a crash mid-write leaves no half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .sources import RawData, cache_dir

CACHE_VERSION = 1


def fingerprint(entries: list[tuple[str, int, int]], **settings) -> str:
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "settings": settings}, sort_keys=True).encode())
    for e in entries:
        h.update(f"{e[0]}\0{e[1]}\0{e[2]}\n".encode())
    return h.hexdigest()


def cached(key_path: Path, fp: str, build: Callable[[], RawData]) -> RawData:
    """Return the cached arrays for ``key_path`` if the fingerprint matches, else build and store them."""
    folder = cache_dir() / "decoded" / hashlib.sha256(str(Path(key_path).resolve()).encode()).hexdigest()[:16]
    file = folder / "data.npz"
    meta_file = folder / "meta.json"
    if file.exists() and meta_file.exists():
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("fingerprint") == fp:
                with np.load(file, allow_pickle=False) as z:
                    return RawData(z["train_x"], z["train_y"], z["test_x"], z["test_y"], meta["classes"],
                                   source=meta["source"], skipped=meta.get("skipped", 0))
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            pass  # a damaged cache is rebuilt
    raw = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        meta_file.unlink(missing_ok=True)  # arrays and fingerprint must never disagree
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, train_x=raw.train_x, train_y=raw.train_y, test_x=raw.test_x, test_y=raw.test_y)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
        meta_file.write_text(json.dumps({"fingerprint": fp, "classes": raw.classes, "source": raw.source,
                                         "skipped": raw.skipped}))
    except OSError:
        pass  # no cache (read-only or full disk) only costs time next run
    return raw
