"""Image-folder source: ``ROOT/<class>/*``, ``ROOT/train/<class>/*`` with ``test/`` and/or ``val/`` beside it.

Split folders are found by their usual spellings (``train``/``training``, ``val``/``valid``/``validation``,
``test``/``testing``, any case); classes are the training folder's subfolders in sorted order.

Any format Pillow reads; grayscale, RGBA, palette and other sizes are converted
to RGB at the configured size. Decoding runs once in a process pool and the
result is cached (see :mod:`cifarlab.data.cache`).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..errors import DataError
from ..pixels import to_rgb_array
from .registry import RawData, Source, register_source

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


def _subdirs(path: Path) -> list[str]:
    return sorted(d.name for d in os.scandir(path) if d.is_dir() and not d.name.startswith("."))


def _has_images(path: Path) -> bool:
    return any(e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTS for e in os.scandir(path))


def detect_layout(root: Path) -> dict[str, Path] | None:
    """The split folders of an image folder: {'train': ..., 'val': ..., 'test': ...} as present, or
    {'all': root} for ``ROOT/<class>/*`` with no split given; None when ``root`` is no image folder."""
    root = Path(root)
    if not root.is_dir():
        return None
    names = {n.lower(): n for n in _subdirs(root)}
    found = {}
    for split, spellings in SPLIT_NAMES.items():
        for s in spellings:
            if s in names:
                found[split] = root / names[s]
                break
    if "train" in found:
        return found
    if found:  # val/ or test/ but no train/: not a layout we can train from
        return None
    if names and any(_has_images(root / n) for n in names.values()):
        return {"all": root}
    return None


def is_image_folder(path: Path) -> bool:
    return detect_layout(Path(path)) is not None


def _list_split(d: Path, classes: list[str], split: str, required: bool) -> list[tuple[Path, int]]:
    items = []
    for label, cls in enumerate(classes):
        cd = d / cls
        if not cd.is_dir():
            if required:
                raise DataError(f"class folder missing: {cd}")
            continue
        imgs = sorted(e.path for e in os.scandir(cd) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTS)
        if not imgs and required:
            raise DataError(f"class folder has no images: {cd}")
        items += [(Path(p), label) for p in imgs]
    if not items:
        raise DataError(f"no images in {d}")
    return items


def list_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Classes (sorted) and, per split found ('train', 'val', 'test' or 'all'), the (file, label) pairs in a
    stable order."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path not found: {root}")
    layout = detect_layout(root)
    if layout is None:
        raise DataError(f"{root} is not an image folder: expected {root}/<class>/* or {root}/train/<class>/* "
                        f"(with test/ and optionally val/)")
    main = layout.get("train", layout.get("all"))
    classes = _subdirs(main)
    if not classes:
        raise DataError(f"{main} has no class folders")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, d in layout.items():
        if split in ("val", "test"):
            extra = set(_subdirs(d)) - set(classes)
            if extra:
                raise DataError(f"{d} has classes not in {main.name}: {', '.join(sorted(extra))}")
        files[split] = _list_split(d, classes, split, required=split in ("train", "all"))
    return classes, files


def fingerprint_entries(files: dict[str, list[tuple[Path, int]]]) -> list[tuple[str, int, int]]:
    out = []
    for split in sorted(files):
        for p, _ in files[split]:
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
    return out


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """Read one image as (size, size, 3) uint8 RGB; raises DataError naming the file."""
    try:
        with warnings.catch_warnings():
            # A damaged header can claim a huge size (Pillow warns, then refuses at 2x its limit) and a cut-off
            # TIFF only warns: both are bad files here, not images to decode in part.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("error", message="Truncated File Read")
            with Image.open(path) as im:
                im.load()
                return to_rgb_array(im, size)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, UserWarning) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def _decode_chunk(args: tuple[list[str], int, bool]) -> tuple[np.ndarray, list[int]]:
    paths, size, skip = args
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    bad = []
    for i, p in enumerate(paths):
        try:
            out[i] = decode_image(p, size)
        except DataError as e:
            if not skip:
                raise DataError(f"{e} (--skip-bad-images skips and counts unreadable images)") from None
            bad.append(i)
    return out, bad


def decode_files(items: list[tuple[Path, int]], size: int, skip_bad: bool, desc: str,
                 workers: int | None = None, bad_out: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    paths = [str(p) for p, _ in items]
    labels = np.array([y for _, y in items], np.int64)
    chunks = [paths[i:i + 512] for i in range(0, len(paths), 512)]
    workers = workers or min(os.cpu_count() or 1, 8)
    parts, bad_idx = [], []
    bar = tqdm(total=len(paths), desc=desc, unit="img", leave=False, disable=None if len(paths) >= 2000 else True)
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(workers) as ex:
            results = ex.map(_decode_chunk, [(c, size, skip_bad) for c in chunks])
            for k, (arr, bad) in enumerate(results):
                parts.append(arr)
                bad_idx += [k * 512 + b for b in bad]
                bar.update(len(arr))
    else:
        for k, c in enumerate(chunks):
            arr, bad = _decode_chunk((c, size, skip_bad))
            parts.append(arr)
            bad_idx += [k * 512 + b for b in bad]
            bar.update(len(arr))
    bar.close()
    x = np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.uint8)
    if bad_out is not None:
        bad_out += bad_idx
    if bad_idx:
        keep = np.ones(len(x), bool)
        keep[bad_idx] = False
        x, labels = x[keep], labels[keep]
    return x, labels, len(bad_idx)


def _image_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return (0, 0)  # unreadable: decode_files names it (or skips it)


def _sizes_chunk(paths: list[str]) -> list[tuple[int, int]]:
    return [_image_size(p) for p in paths]


def scan_sizes(paths: list[str], workers: int | None = None) -> Counter:
    """How many images of each (width, height), from the headers alone."""
    chunks = [paths[i:i + 2048] for i in range(0, len(paths), 2048)]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(workers) as ex:
            results = list(ex.map(_sizes_chunk, chunks))
    else:
        results = [_sizes_chunk(c) for c in chunks]
    return Counter(s for r in results for s in r if s != (0, 0))


def pick_size(sizes: Counter, source: str) -> tuple[int, dict]:
    """The side to decode at when ``data.image_size`` is not set: the images' own when they share one square
    size; else the most common size's longer side (ties: the larger), flagged as mixed in the info."""
    if not sizes:
        raise DataError(f"{source}: no readable image")
    (w, h), _ = max(sizes.items(), key=lambda kv: (kv[1], max(kv[0])))
    info = {"sizes": {f"{a}x{b}": n for (a, b), n in sizes.most_common(10)}, "mixed_sizes": len(sizes) > 1}
    return max(w, h), info


def split_files(files: dict[str, list[tuple[Path, int]]], root: Path | None,
                skipped: dict[str, list[int]] | None = None) -> dict[str, list[str]]:
    """Per split of the data (``all`` is ``train``), its images' paths relative to ``root``, less the skipped."""
    def rel(p: Path) -> str:
        try:
            return Path(p).relative_to(root).as_posix() if root is not None else Path(p).as_posix()
        except ValueError:
            return Path(p).as_posix()

    out = {}
    for split, items in files.items():
        bad = set((skipped or {}).get(split, ()))
        out["train" if split == "all" else split] = [rel(p) for k, (p, _) in enumerate(items) if k not in bad]
    return out


def decode_splits(files: dict[str, list[tuple[Path, int]]], classes: list[str], size: int | None, skip_bad: bool,
                  source: str, info: dict | None = None, root: Path | None = None) -> RawData:
    """Decode each split's files at ``size`` (None: from the images, see :func:`pick_size`). The info records
    each image's path relative to ``root`` (``files``), by which the audit and data.exclude name it."""
    info = dict(info or {})
    if size is None:
        size, found = pick_size(scan_sizes([str(p) for items in files.values() for p, _ in items]), source)
        info.update(found)
    out, skipped, bad_at = {}, 0, {}
    for split, items in files.items():
        x, y, bad = decode_files(items, size, skip_bad, f"decode {split}", bad_out=bad_at.setdefault(split, []))
        out[split] = (x, y)
        skipped += bad
    if root is not None:
        info["root"] = str(root)
    info["files"] = split_files(files, root, bad_at)
    main = out.pop("train", None) or out.pop("all")
    val, test = out.get("val", (None, None)), out.get("test", (None, None))
    return RawData(main[0], main[1], test[0], test[1], classes, source=source, skipped=skipped,
                   val_x=val[0], val_y=val[1], info=info).check()


def load_folder(root: Path, size: int | None, skip_bad: bool = False) -> RawData:
    classes, files = list_folder(root)
    layout = "/".join(sorted(files)) if "all" not in files else "<class>/* (no split given)"
    return decode_splits(files, classes, size, skip_bad, str(root), {"layout": layout}, root=root)


@register_source("folder")
def _resolve(spec: str | None, cfg) -> Source | None:
    if spec is None:
        return None
    p = Path(spec).expanduser()
    if not is_image_folder(p):
        return None

    def load(c) -> RawData:
        from .cache import cached, fingerprint

        classes, files = list_folder(p)
        fp = fingerprint(fingerprint_entries(files), kind="folder", size=c.image_size, skip=c.skip_bad_images)
        raw = cached(p, fp, lambda: load_folder(p, c.image_size, c.skip_bad_images))
        if "files" not in raw.info and not raw.skipped:  # a cache written before paths were recorded
            raw.info.update(root=str(p), files=split_files(files, p))
        return raw

    return Source("folder", p, load)
