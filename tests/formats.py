"""Small data sets written in each official format (and as folders / labels files), for the data tests.

Every writer makes random images with labels cycling through the classes, so the tests can check what
comes back against what was written.
"""

from __future__ import annotations

import csv
import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def images(n: int, size: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, size, size, channels) if channels > 1 else (n, size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def write_cifar100(folder: Path, n_train: int = 500, n_test: int = 100) -> dict:
    """cifar-100-python.tar.gz: pickled dicts with bytes keys, fine (100) and coarse (20) labels."""
    out = {}
    members = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        x = images(n, 32, seed)
        fine = [i % 100 for i in range(n)]
        coarse = [f // 5 for f in fine]
        members[f"cifar-100-python/{split}"] = pickle.dumps({
            b"filenames": [f"{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
            b"fine_labels": fine, b"coarse_labels": coarse,
            b"data": np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(n, 3072))}, protocol=2)
        out[split] = (x, np.array(fine), np.array(coarse))
    members["cifar-100-python/meta"] = pickle.dumps({
        b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)]}, protocol=2)
    _tar_gz(folder / "cifar-100-python.tar.gz", members)
    return out


def _idx(arr: np.ndarray) -> bytes:
    """An IDX file (LeCun's format): magic 0x0000 0x08 (uint8) ndim, big-endian int32 dims, then the data."""
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_mnist(folder: Path, n_train: int = 120, n_test: int = 60) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n, seed in (("train", n_train, 3), ("t10k", n_test, 4)):
        x = images(n, 28, seed, channels=1)
        y = (np.arange(n) % 10).astype(np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(x)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(y)))
        out[prefix] = (x, y)
    return out


def write_svhn(folder: Path, n_train: int = 100, n_test: int = 50) -> dict:
    """train_32x32.mat / test_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with the digit 0 stored as 10."""
    import scipy.io as sio

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, seed in (("train", n_train, 5), ("test", n_test, 6)):
        x = images(n, 32, seed)
        digit = np.arange(n) % 10
        sio.savemat(folder / f"{split}_32x32.mat", {"X": x.transpose(1, 2, 3, 0),
                                                    "y": np.where(digit == 0, 10, digit).astype(np.uint8)[:, None]})
        out[split] = (x, digit)
    return out


def write_stl10(folder: Path, n_train: int = 30, n_test: int = 20) -> dict:
    """stl10_binary.tar.gz: (N, 3, 96, 96) uint8 planes stored column-major, labels 1..10, class_names.txt."""
    out, members = {}, {}
    for split, n, seed in (("train", n_train, 7), ("test", n_test, 8)):
        x = images(n, 96, seed)
        y = np.arange(n) % 10
        members[f"stl10_binary/{split}_X.bin"] = np.ascontiguousarray(x.transpose(0, 3, 2, 1)).tobytes()
        members[f"stl10_binary/{split}_y.bin"] = (y + 1).astype(np.uint8).tobytes()
        out[split] = (x, y)
    members["stl10_binary/class_names.txt"] = "\n".join(
        ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]).encode()
    _tar_gz(folder / "stl10_binary.tar.gz", members)
    return out


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: 1,797 8x8 images (0..16 scaled to 0..255), 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255 / 16)).round().astype(np.uint8), d.target


def write_digits_layout(root: Path, layout: str) -> Path:
    """Digits as one of: 'flat' (ROOT/<class>/*), 'train-test', 'train-val-test', 'train-valid', 'csv',
    'csv-split' (a labels file with a split column, Kaggle ids without extensions)."""
    x, y = digits()
    n = len(y)
    split = np.where(np.arange(n) % 5 == 0, "test", np.where(np.arange(n) % 5 == 1, "val", "train"))
    rows = []
    for i in range(n):
        s = split[i]
        if layout == "flat":
            d = root / str(y[i])
        elif layout == "train-test":
            d = root / ("test" if s == "test" else "train") / str(y[i])
        elif layout == "train-val-test":
            d = root / s / str(y[i])
        elif layout == "train-valid":
            d = root / ("valid" if s == "val" else "train") / str(y[i])
        else:
            d = root / "images"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(d / f"img{i:04d}.png")
        rows.append((f"img{i:04d}", str(y[i]), s))
    if layout.startswith("csv"):
        with open(root / "images" / "labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "label"] + (["split"] if layout == "csv-split" else []))
            for r in rows:
                w.writerow(r if layout == "csv-split" else r[:2])
        return root / "images"
    return root


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def learnable_images(labels: np.ndarray, size: int = 32, seed: int = 0) -> np.ndarray:
    """(N, size, size, 3) uint8 images a small network tells apart, though not perfectly.

    Class k is a hue (k/10 of the colour wheel, jittered by up to half the distance to the next) under a
    grey sine grating of class-specific orientation and frequency (random phase), plus Gaussian pixel noise:
    colour survives flips, crops and rotations, the grating rewards convolutions, and the jitter and noise
    keep accuracy below 100%, as on real photographs.
    """
    rng = np.random.default_rng(seed)
    k = np.asarray(labels)
    n = len(k)
    hue = (k / 10 + rng.uniform(-0.05, 0.05, n)) % 1.0
    sat, val = rng.uniform(0.45, 0.75, n), rng.uniform(0.45, 0.85, n)
    # HSV -> RGB (colorsys, vectorized): each channel is val * (1 - sat * clamp(...)) on the hue's sextant
    c = np.stack([(5 + hue * 6) % 6, (3 + hue * 6) % 6, (1 + hue * 6) % 6], 1)
    rgb = val[:, None] * (1 - sat[:, None] * np.clip(np.minimum(c, 4 - c), 0, 1))  # (N, 3) in [0, 1]
    theta = (k % 5) * np.pi / 5
    freq = np.where(k < 5, 2.0, 4.0) * 2 * np.pi / size  # 2 or 4 periods across the image
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    proj = np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy
    grating = np.sin(freq[:, None, None] * proj + rng.uniform(0, 2 * np.pi, n)[:, None, None])  # (N, H, W)
    x = 255 * rgb[:, None, None, :] + 40 * grating[..., None] + rng.normal(0, 25, (n, size, size, 3))
    return np.clip(x, 0, 255).round().astype(np.uint8)


def write_cifar10_jpeg(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """CIFAR-10 as an image folder, the way our development copy stores it: ``ROOT/{train,test}/<class>/NNNN.jpg``,
    32x32 RGB JPEG at quality 75, the ten class names, ``n_train`` / ``n_test`` images per class. Deterministic."""
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        labels = np.repeat(np.arange(10), n)
        x = learnable_images(labels, 32, s)
        for i, (img, label) in enumerate(zip(x, labels)):
            d = root / split / CIFAR10_CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i % n:04d}.jpg", quality=75)
    return root
