"""Decode once, then load in seconds: uint8 arrays cached beside a fingerprint, as memory maps.

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

from .registry import RawData, cache_dir

CACHE_VERSION = 2  # 2: one memory-mappable .npy per split and array


def fingerprint(entries: list[tuple[str, int, int]], **settings) -> str:
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "settings": settings}, sort_keys=True).encode())
    for e in entries:
        h.update(f"{e[0]}\0{e[1]}\0{e[2]}\n".encode())
    return h.hexdigest()


def _write_npy(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached(key_path: Path, fp: str, build: Callable[[], RawData]) -> RawData:
    """Return the cached arrays for ``key_path`` if the fingerprint matches, else build and store them.

    One uncompressed ``.npy`` per array, opened as read-only memory maps: a data set larger than memory is
    paged in as batches touch it (see :mod:`cifarlab.data.streaming`). ``meta.json`` is written last and
    removed first, so arrays and fingerprint never disagree after a crash.
    """
    folder = cache_dir() / "decoded" / hashlib.sha256(str(Path(key_path).resolve()).encode()).hexdigest()[:16]
    meta_file = folder / "meta.json"
    if meta_file.exists():
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("fingerprint") == fp:
                arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in meta["arrays"]}
                return RawData(arrays["train_x"], arrays["train_y"], arrays.get("test_x"), arrays.get("test_y"),
                               meta["classes"], source=meta["source"], skipped=meta.get("skipped", 0),
                               val_x=arrays.get("val_x"), val_y=arrays.get("val_y"), info=meta.get("info", {}))
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            pass  # a damaged cache is rebuilt
    raw = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        meta_file.unlink(missing_ok=True)  # arrays and fingerprint must never disagree
        for stale in folder.glob(".*.tmp"):  # what a write killed mid-way left (SIGKILL runs no cleanup)
            stale.unlink(missing_ok=True)
        names = []
        for split in raw.splits():
            for part in ("x", "y"):
                _write_npy(folder / f"{split}_{part}.npy", getattr(raw, f"{split}_{part}"))
                names.append(f"{split}_{part}")
        meta = {"fingerprint": fp, "classes": raw.classes, "source": raw.source, "skipped": raw.skipped,
                "arrays": names, "info": raw.info}
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".meta.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(meta))
        os.replace(tmp, meta_file)
    except OSError:
        pass  # no cache (read-only or full disk) only costs time next run
    return raw
