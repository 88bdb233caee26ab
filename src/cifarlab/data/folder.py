"""Image-folder source: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``.

Any format Pillow reads; grayscale, RGBA, palette and other sizes are converted
to RGB at the configured size. Decoding runs once in a process pool and the
result is cached (see :mod:`cifarlab.data.cache`).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..errors import DataError
from .sources import RawData

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def is_image_folder(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def list_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Classes (sorted) and, per split, the (file, label) pairs in a stable order."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path not found: {root}")
    if not is_image_folder(root):
        raise DataError(f"{root} is not an image folder: expected {root}/train/<class>/ and {root}/test/<class>/")
    classes = sorted(d.name for d in os.scandir(root / "train") if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders")
    test_classes = sorted(d.name for d in os.scandir(root / "test") if d.is_dir() and not d.name.startswith("."))
    extra = set(test_classes) - set(classes)
    if extra:
        raise DataError(f"{root / 'test'} has classes not in train: {', '.join(sorted(extra))}")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in ("train", "test"):
        items = []
        for label, cls in enumerate(classes):
            d = root / split / cls
            if not d.is_dir():
                if split == "train":
                    raise DataError(f"class folder missing: {d}")
                continue
            imgs = sorted(e.path for e in os.scandir(d) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTS)
            if not imgs and split == "train":
                raise DataError(f"class folder has no images: {d}")
            items += [(Path(p), label) for p in imgs]
        if not items:
            raise DataError(f"no images in {root / split}")
        files[split] = items
    return classes, files


def fingerprint_entries(files: dict[str, list[tuple[Path, int]]]) -> list[tuple[str, int, int]]:
    out = []
    for split in ("train", "test"):
        for p, _ in files[split]:
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
    return out


def to_rgb_array(im: Image.Image, size: int) -> np.ndarray:
    """A loaded Pillow image of any mode and size as (size, size, 3) uint8 RGB (also used by ``predict``)."""
    if im.mode != "RGB":
        if im.mode in ("RGBA", "LA", "P", "PA"):  # composite transparency on black, like zeros
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


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
                 workers: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
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
    if bad_idx:
        keep = np.ones(len(x), bool)
        keep[bad_idx] = False
        x, labels = x[keep], labels[keep]
    return x, labels, len(bad_idx)


def load_folder(root: Path, size: int, skip_bad: bool = False) -> RawData:
    classes, files = list_folder(root)
    tx, ty, bad1 = decode_files(files["train"], size, skip_bad, "decode train")
    vx, vy, bad2 = decode_files(files["test"], size, skip_bad, "decode test")
    return RawData(tx, ty, vx, vy, classes, source=str(root), skipped=bad1 + bad2).check()
