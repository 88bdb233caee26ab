"""Standard data sets by name: ``--data cifar10 | cifar100 | cifar100-coarse | mnist | fashion-mnist | svhn | stl10``.

Each is downloaded on first use into ``$CIFARLAB_CACHE/datasets/<name>/`` from its official address with the
md5 that torchvision checks (the addresses and checksums are read from torchvision's dataset classes, so they
stay those of a well-kept library), then decoded with torchvision's parsers where they are safe: IDX files
(``torchvision.datasets.mnist.read_image_file``), SVHN's MATLAB files through SciPy's ``loadmat`` (as
torchvision's ``SVHN``), STL-10's raw binary laid out as torchvision's ``STL10`` reads it. CIFAR-100 is
pickled, and torchvision unpickles it unrestricted; it goes through cifarlab's restricted unpickler instead
(:mod:`cifarlab.data.archive`), so a crafted file is refused and never runs code.

``$CIFARLAB_MIRROR`` (a URL prefix) fetches every file from a mirror by its file name instead; tests serve
small files in each official format that way.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torchvision.datasets as tvd

from ..errors import DataError
from .registry import RawData, Source, cache_dir, register_source


@dataclass(frozen=True)
class NamedSet:
    files: tuple[tuple[str, str, str], ...]  # (url, file name, md5)
    decode: Callable[[Path], RawData]
    size: int  # native image side in pixels
    about: str


def _gray_to_rgb(x: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, H, W, 3): the models take 3 channels; a gray image is the same in each."""
    return np.ascontiguousarray(np.repeat(x[..., None], 3, axis=-1))


# --------------------------------------------------------------------------- decoders
def _decode_cifar10(folder: Path) -> RawData:
    from .archive import ARCHIVE_NAME, load_archive

    return load_archive(folder / ARCHIVE_NAME, verify_md5=True)


def _read_tar(path: Path, wanted: set[str]) -> dict[str, bytes]:
    """The named members of a tar(.gz) by base name, read in place (nothing extracted)."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                base = m.name.rstrip("/").rsplit("/", 1)[-1]
                if m.isfile() and base in wanted and base not in out:
                    f = tar.extractfile(m)
                    out[base] = f.read() if f else b""
                    if len(out) == len(wanted):
                        break
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable tar.gz archive ({type(e).__name__}: {e})") from None
    missing = wanted - set(out)
    if missing:
        raise DataError(f"{path}: archive lacks {', '.join(sorted(missing))}")
    return out


def _decode_cifar100(folder: Path, coarse: bool = False) -> RawData:
    from .archive import _get, _load_pickle_stream

    path = folder / tvd.CIFAR100.filename
    parts = _read_tar(path, {"train", "test", "meta"})
    obj = {k: _load_pickle_stream(io.BytesIO(v), f"{path}:{k}") for k, v in parts.items()}
    key = "coarse" if coarse else "fine"
    names = _get(obj["meta"], f"{key}_label_names", f"{path}:meta")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        d = obj[name]
        data = np.asarray(_get(d, "data", f"{path}:{name}"))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}:{name}: 'data' must be uint8 (N, 3072), found {data.dtype} {data.shape}")
        y = np.asarray(_get(d, f"{key}_labels", f"{path}:{name}"), np.int64)
        return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), y

    (tx, ty), (sx, sy) = split("train"), split("test")
    return RawData(tx, ty, sx, sy, classes, source=f"cifar100{'-coarse' if coarse else ''}").check()


def _decode_idx(folder: Path, classes: list[str], name: str) -> RawData:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    def read(gz: str, reader) -> np.ndarray:
        raw = folder / gz.removesuffix(".gz")
        if not raw.exists():  # torchvision reads uncompressed IDX files: unpack once, atomically
            tmp = raw.with_suffix(".tmp")
            try:
                with gzip.open(folder / gz, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as e:
                tmp.unlink(missing_ok=True)
                raise DataError(f"{folder / gz}: not a readable gzip file ({e})") from None
            os.replace(tmp, raw)
        try:
            return reader(str(raw)).numpy()
        except (RuntimeError, ValueError, AssertionError, TypeError) as e:
            raise DataError(f"{raw}: not an IDX file ({e})") from None

    tx = read("train-images-idx3-ubyte.gz", read_image_file)
    ty = read("train-labels-idx1-ubyte.gz", read_label_file)
    sx = read("t10k-images-idx3-ubyte.gz", read_image_file)
    sy = read("t10k-labels-idx1-ubyte.gz", read_label_file)
    return RawData(_gray_to_rgb(tx), ty.astype(np.int64), _gray_to_rgb(sx), sy.astype(np.int64),
                   classes, source=name).check()


def _decode_svhn(folder: Path) -> RawData:
    import scipy.io as sio

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = folder / tvd.SVHN.split_list[name][1]
        try:
            mat = sio.loadmat(str(path))  # MATLAB v5: arrays only, no code
            x, y = mat["X"], mat["y"].astype(np.int64).squeeze(-1)
        except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
            raise DataError(f"{path}: not an SVHN .mat file ({type(e).__name__}: {e})") from None
        np.place(y, y == 10, 0)  # SVHN writes the digit 0 as class 10 (torchvision does the same)
        return np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2)).astype(np.uint8)), y  # (H, W, 3, N) -> NHWC

    (tx, ty), (sx, sy) = split("train"), split("test")
    return RawData(tx, ty, sx, sy, [str(i) for i in range(10)], source="svhn").check()


def _decode_stl10(folder: Path) -> RawData:
    path = folder / tvd.STL10.filename
    names = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", tvd.STL10.class_names_file]
    parts = _read_tar(path, set(names))

    def images(b: bytes) -> np.ndarray:
        if len(b) % (3 * 96 * 96):
            raise DataError(f"{path}: image data of {len(b)} bytes is not a whole number of 3x96x96 images")
        # Column-major planes, as torchvision's STL10 reads them: (N, 3, W, H) -> NHWC
        x = np.frombuffer(b, np.uint8).reshape(-1, 3, 96, 96)
        return np.ascontiguousarray(x.transpose(0, 3, 2, 1))

    def labels(b: bytes) -> np.ndarray:
        return np.frombuffer(b, np.uint8).astype(np.int64) - 1  # 1-based on disk

    classes = parts[tvd.STL10.class_names_file].decode().split()
    return RawData(images(parts["train_X.bin"]), labels(parts["train_y.bin"]), images(parts["test_X.bin"]),
                   labels(parts["test_y.bin"]), classes, source="stl10").check()


def _mnist_files(cls) -> tuple[tuple[str, str, str], ...]:
    return tuple((cls.mirrors[0] + f, f, md5) for f, md5 in cls.resources)


NAMED: dict[str, NamedSet] = {
    "cifar10": NamedSet((("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                          "c58f30108f718f92721af3b95e74349a"),), _decode_cifar10, 32,
                        "60,000 32x32 colour images, 10 classes"),
    "cifar100": NamedSet(((tvd.CIFAR100.url, tvd.CIFAR100.filename, tvd.CIFAR100.tgz_md5),), _decode_cifar100, 32,
                         "60,000 32x32 colour images, 100 classes"),
    "cifar100-coarse": NamedSet(((tvd.CIFAR100.url, tvd.CIFAR100.filename, tvd.CIFAR100.tgz_md5),),
                                lambda f: _decode_cifar100(f, coarse=True), 32,
                                "CIFAR-100's images with its 20 superclasses"),
    "mnist": NamedSet(_mnist_files(tvd.MNIST), lambda f: _decode_idx(f, list(tvd.MNIST.classes), "mnist"), 28,
                      "70,000 28x28 handwritten digits"),
    "fashion-mnist": NamedSet(_mnist_files(tvd.FashionMNIST),
                              lambda f: _decode_idx(f, list(tvd.FashionMNIST.classes), "fashion-mnist"), 28,
                              "70,000 28x28 clothing images, 10 classes"),
    "svhn": NamedSet(tuple(tuple(tvd.SVHN.split_list[s]) for s in ("train", "test")), _decode_svhn, 32,
                     "99,289 32x32 house-number digits (train and test; 'extra' not used)"),
    "stl10": NamedSet(((tvd.STL10.url, tvd.STL10.filename, tvd.STL10.tgz_md5),), _decode_stl10, 96,
                      "13,000 labelled 96x96 colour images, 10 classes (the unlabelled part is not used)"),
}


def dataset_folder(name: str) -> Path:
    if name == "cifar10":  # where cifarlab has always downloaded it: $CIFARLAB_CACHE/cifar-10-python.tar.gz
        return cache_dir()
    return cache_dir() / "datasets" / name.replace("-coarse", "")


def _url(url: str, file: str) -> str:
    mirror = os.environ.get("CIFARLAB_MIRROR")
    return f"{mirror.rstrip('/')}/{file}" if mirror else url


def fetch(name: str) -> Path:
    """Download (or reuse) the files of a named set; return their folder."""
    from .archive import download

    spec = NAMED[name]
    folder = dataset_folder(name)
    for url, file, md5 in spec.files:
        if not (folder / file).is_file():
            download(_url(url, file), folder, md5, filename=file)
    return folder


def load_named(name: str) -> RawData:
    from .cache import cached, fingerprint

    folder = fetch(name)
    if name == "cifar10":  # the official archive: cached and md5-checked as any archive of that name
        from .archive import ARCHIVE_NAME, load_archive_cached

        return load_archive_cached(folder / ARCHIVE_NAME)
    entries = []
    for _, f, _ in NAMED[name].files:
        st = (folder / f).stat()
        entries.append((str(folder / f), st.st_size, st.st_mtime_ns))
    return cached(folder / name, fingerprint(entries, kind="named", name=name), lambda: NAMED[name].decode(folder))


@register_source("named")
def _resolve(spec: str | None, cfg) -> Source | None:
    if spec is None:  # no --data and no $CIFARLAB_DATA: CIFAR-10, downloaded into the cache on first use
        spec = "cifar10"
    elif Path(spec).expanduser().exists():  # an existing path wins over a name (./mnist is a folder)
        return None
    key = spec.lower()
    if key not in NAMED:
        return None
    folder = dataset_folder(key)
    present = all((folder / f).is_file() for _, f, _ in NAMED[key].files)
    kind = ("archive" if key == "cifar10" else "named") if present else "download"
    path = folder / NAMED[key].files[0][1] if key == "cifar10" and present else folder
    return Source(kind, path, lambda c: load_named(key), name=key)
