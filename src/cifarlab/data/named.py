"""Standard data sets by name: ``--data cifar10 | cifar100 | cifar100-coarse | mnist | fashion-mnist | svhn | stl10``.

Each is downloaded on first use into ``$CIFARLAB_CACHE/datasets/<name>/`` from its official address with the
md5 that torchvision checks (the addresses and checksums are read from torchvision's dataset classes, so they
stay those of a well-kept library), then decoded as the same files given by path are
(:func:`cifarlab.data.archive.load_official`): IDX files with torchvision's parser, SVHN's MATLAB files through
SciPy's ``loadmat`` (as torchvision's ``SVHN``), STL-10's raw binary laid out as torchvision's ``STL10`` reads
it. The CIFAR sets are pickled, and torchvision unpickles them unrestricted; they go through cifarlab's
restricted unpickler instead, so a crafted file is refused and never runs code.

``$CIFARLAB_MIRROR`` (a URL prefix) fetches every file from a mirror by its file name instead; tests serve
small files in each official format that way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torchvision.datasets as tvd

from .archive import ARCHIVE_NAME, CIFAR10_MD5, CIFAR10_URL, download, load_official_cached
from .registry import RawData, Source, cache_dir, register_source


@dataclass(frozen=True)
class NamedSet:
    files: tuple[tuple[str, str, str], ...]  # (url, file name, md5): one official archive, or the set's files
    size: int  # native image side in pixels
    about: str


def _mnist_files(cls) -> tuple[tuple[str, str, str], ...]:
    return tuple((cls.mirrors[0] + f, f, md5) for f, md5 in cls.resources)


NAMED: dict[str, NamedSet] = {
    "cifar10": NamedSet(((CIFAR10_URL, ARCHIVE_NAME, CIFAR10_MD5),), 32, "60,000 32x32 colour images, 10 classes"),
    "cifar100": NamedSet(((tvd.CIFAR100.url, tvd.CIFAR100.filename, tvd.CIFAR100.tgz_md5),), 32,
                         "60,000 32x32 colour images, 100 classes"),
    "cifar100-coarse": NamedSet(((tvd.CIFAR100.url, tvd.CIFAR100.filename, tvd.CIFAR100.tgz_md5),), 32,
                                "CIFAR-100's images with its 20 superclasses"),
    "mnist": NamedSet(_mnist_files(tvd.MNIST), 28, "70,000 28x28 handwritten digits"),
    "fashion-mnist": NamedSet(_mnist_files(tvd.FashionMNIST), 28, "70,000 28x28 clothing images, 10 classes"),
    "svhn": NamedSet(tuple(tuple(tvd.SVHN.split_list[s]) for s in ("train", "test")), 32,
                     "99,289 32x32 house-number digits (train and test; 'extra' not used)"),
    "stl10": NamedSet(((tvd.STL10.url, tvd.STL10.filename, tvd.STL10.tgz_md5),), 96,
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
    spec = NAMED[name]
    folder = dataset_folder(name)
    for url, file, md5 in spec.files:
        if not (folder / file).is_file():
            download(_url(url, file), folder, md5, filename=file)
    return folder


def load_named(name: str) -> RawData:
    """Download (or reuse) a named set's files and decode them as the same files given by path are; the set's
    name picks its labels where sets share a format (cifar100-coarse, fashion-mnist)."""
    folder = fetch(name)
    files = NAMED[name].files
    # cifar10 keeps the archive's path as its source, as it always has (runs record it as data_source)
    source = None if name == "cifar10" else name
    if len(files) == 1:  # one official archive: md5-checked again whenever it is decoded
        _, file, md5 = files[0]
        return load_official_cached(folder / file, name, md5, source)
    return load_official_cached(folder, name, source=source)


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
