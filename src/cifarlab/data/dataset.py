"""Resolve the source, split train/validation, compute normalization, hold tensors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..config import DataConfig
from ..errors import DataError
from . import folder
from .cache import cached, fingerprint
from .sources import RawData, cache_dir


@dataclass
class CifarData:
    """Splits as uint8 tensors (N, 3, H, W) and int64 labels, plus class names and normalization."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: list[float]  # per channel, of the training split, in [0, 1] units
    std: list[float]
    source: str = ""
    skipped: int = 0
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def resolve_source(path: str | None) -> tuple[str, Path | None]:
    """Return (kind, path): kind is 'folder', 'archive' or 'download'."""
    path = path or os.environ.get("CIFARLAB_DATA") or None
    if path is None:
        from .archive import ARCHIVE_NAME

        local = cache_dir() / ARCHIVE_NAME
        return ("archive", local) if local.exists() else ("download", None)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path not found: {p} (pass --data PATH: an image folder with train/ and test/, "
                        f"cifar-10-python.tar.gz or cifar-10-batches-py/)")
    if p.is_dir() and folder.is_image_folder(p):
        return "folder", p
    if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
        return "archive", p
    if p.is_dir() and ((p / "data_batch_1").exists() or (p / "cifar-10-batches-py").is_dir()):
        return "archive", p
    if p.is_dir() and not any(p.iterdir()):
        raise DataError(f"data folder is empty: {p}")
    raise DataError(f"{p} is neither an image folder (train/<class>, test/<class>) nor a CIFAR-10 archive")


def load_raw(cfg: DataConfig) -> RawData:
    kind, path = resolve_source(cfg.path)
    if kind == "download":
        from .archive import download

        path = download()
        kind = "archive"
    assert path is not None
    if kind == "archive":
        from .archive import ARCHIVE_NAME, load_archive

        st = path.stat()
        fp = fingerprint([(str(path.resolve()), st.st_size, st.st_mtime_ns)], kind="archive",
                         size=cfg.image_size)
        # A file with the official name must be the official file: its md5 (~0.5 s) is checked whenever it is
        # decoded, i.e. once per new or changed file (a decoded cache hit skips it). Other names are own archives.
        official = path.is_file() and path.name == ARCHIVE_NAME
        raw = cached(path, fp, lambda: load_archive(path, verify_md5=official))
        if raw.train_x.shape[1] != cfg.image_size:
            raw = _resize(raw, cfg.image_size)
        return raw
    classes, files = folder.list_folder(path)
    fp = fingerprint(folder.fingerprint_entries(files), kind="folder", size=cfg.image_size, skip=cfg.skip_bad_images)
    return cached(path, fp, lambda: folder.load_folder(path, cfg.image_size, cfg.skip_bad_images))


def _resize(raw: RawData, size: int) -> RawData:
    import torch.nn.functional as F

    def r(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    return RawData(r(raw.train_x), raw.train_y, r(raw.test_x), raw.test_y, raw.classes, raw.source, raw.skipped)


def split_indices(labels: np.ndarray, train_size: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/validation split of the training set's indices.

    ``train_size`` is an upper bound: a smaller data set trains on all images not held out for validation.
    """
    n = len(labels)
    idx = np.arange(n)
    n_classes = len(np.unique(labels))
    if val_size > n - n_classes:
        raise DataError(f"data.val_size={val_size} leaves too few of the {n} training images for training")
    if val_size == 0:
        val = np.array([], np.int64)
        rest = idx
    else:
        if val_size < n_classes:
            raise DataError(f"data.val_size={val_size} must be 0 or at least the number of classes ({n_classes})")
        rest, val = train_test_split(idx, test_size=val_size, stratify=labels, random_state=seed)
    if train_size < len(rest):
        if train_size < n_classes:
            raise DataError(f"data.train_size={train_size} must be at least the number of classes ({n_classes})")
        train, _ = train_test_split(rest, train_size=train_size, stratify=labels[rest], random_state=seed)
    else:
        train = rest
    return np.sort(train), np.sort(val)


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std in [0, 1] units from a 256-bin histogram of uint8 images."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    mean, std = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1).to(torch.int64), minlength=256).double()
        m = (hist * values).sum() / hist.sum()
        var = (hist * (values - m) ** 2).sum() / hist.sum()
        mean.append(m.item())
        std.append(max(var.sqrt().item(), 1e-6))
    return mean, std


def load_data(cfg: DataConfig) -> CifarData:
    """Load (from cache when possible), split and normalize a data set as described by ``cfg``."""
    raw = load_raw(cfg)
    train_idx, val_idx = split_indices(raw.train_y, cfg.train_size, cfg.val_size, cfg.seed)

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW

    train_x = t(raw.train_x[train_idx])
    # Statistics of the training split only, so validation and test never leak into preprocessing.
    mean, std = channel_stats(train_x)
    return CifarData(
        train_x=train_x, train_y=torch.from_numpy(raw.train_y[train_idx]),
        val_x=t(raw.train_x[val_idx]), val_y=torch.from_numpy(raw.train_y[val_idx]),
        test_x=t(raw.test_x), test_y=torch.from_numpy(raw.test_y),
        classes=list(raw.classes), mean=mean, std=std, source=raw.source, skipped=raw.skipped,
    )
