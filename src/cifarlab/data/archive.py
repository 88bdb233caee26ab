"""The official archive of every named set, given by path: recognized from what it holds, decoded safely.

``--data PATH`` takes a data set's official archive or its extracted folder, whatever the file is called:
:func:`recognize` reads the member names (and, where names are common, the first bytes) and picks the
:class:`Format` whose files are all there. :mod:`cifarlab.data.named` downloads the same files and decodes
them with the same code. The formats:

    CIFAR-10     cifar-10-batches-py/ data_batch_1..5, test_batch, batches.meta   (pickles)
    CIFAR-100    cifar-100-python/ train, test, meta  (pickles; fine and coarse labels in each)
    MNIST, Fashion-MNIST (and any set in their IDX format)
                 train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-... (each may be .gz)
    SVHN         train_32x32.mat, test_32x32.mat  (MATLAB v5)
    STL-10       stl10_binary/ train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt

A file is read as a tar archive (any compression) in place, nothing extracted; a folder is searched itself
and one level down. MNIST and Fashion-MNIST share a format, and CIFAR-100 holds two label sets, so
``data.labels`` picks: see :func:`load_official`.

The CIFAR batches are Python 2 pickles, and unpickling runs whatever
callables a pickle names, so a tampered or mistaken file could run code.
:class:`RestrictedUnpickler` therefore allows only the handful of globals that
rebuilding a numpy array needs; everything else is refused with a
:class:`~cifarlab.errors.DataError`.

Each CIFAR batch is a dict with bytes keys: ``b'data'`` a uint8 array (N, 3072) whose
rows hold the 32x32 red plane, then green, then blue, row-major; and
``b'labels'`` (CIFAR-100: ``b'fine_labels'``, ``b'coarse_labels'``) a list of ints.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import hashlib
import http.client
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torchvision.datasets as tvd
from torchvision.datasets.mnist import read_image_file, read_label_file
from tqdm import tqdm

from ..errors import DataError
from .cache import cached, fingerprint
from .registry import CIFAR10_CLASSES, RawData, Source, cache_dir, register_source

try:  # numpy >= 2 moved the module; importing numpy.core there warns
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
REQUIRED_FILES = (*TRAIN_BATCHES, TEST_BATCH, META_FILE)

IMAGE_SIZE = 32
_ROW_LEN = 3 * IMAGE_SIZE * IMAGE_SIZE
_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60.0

_NO_NETWORK_HINT = (
    "there is no network connection or no copy at that address; point --data "
    f"(or $CIFARLAB_DATA) at a local {ARCHIVE_NAME}, its extracted {BATCH_DIR}/ folder, "
    "or an image folder with train/<class>/ and test/<class>/ subfolders"
)


# --------------------------------------------------------------------------- pickles


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` limited to latin-1.

    Python 3 writes ``bytes`` into protocol-2 pickles as
    ``_codecs.encode(text, 'latin1')``; no other codec is needed, so none other
    is reachable from a pickle.
    """
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return obj.encode("latin-1", errors)


# Exactly the globals an official batch (Python 2 numpy) or write_fake_archive's
# batches (Python 3, protocol 2) reference. Both numpy module spellings map to
# the same function so old and new pickles load on any numpy.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds numpy arrays and plain containers.

    ``source`` names the file in error messages.
    """

    def __init__(self, file: IO[bytes], *, source: str, encoding: str = "bytes") -> None:
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.source}: refusing to unpickle {module}.{name} "
                "(a CIFAR batch holds only numpy arrays, lists, dicts and strings; "
                "the file is corrupt or not a CIFAR-10 batch)"
            ) from None


def _load_pickle_stream(stream: IO[bytes], source: str) -> object:
    try:
        return RestrictedUnpickler(stream, source=source).load()
    except DataError:
        raise
    except Exception as exc:  # any failure decoding untrusted bytes is a data error
        raise DataError(f"{source}: cannot unpickle ({type(exc).__name__}: {exc}); the file is corrupt or truncated") from exc


def safe_load_pickle(path: Path | str) -> object:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="bytes"``).

    Every failure, including a refused global, is raised as a DataError naming the file.
    """
    try:
        with open(path, "rb") as f:
            return _load_pickle_stream(f, str(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc


# --------------------------------------------------------------------------- download


def md5sum(path: Path | str) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _network_error(url: str, exc: BaseException) -> DataError:
    reason = getattr(exc, "reason", None) or exc
    return DataError(f"cannot download {url} ({reason}): {_NO_NETWORK_HINT}")


def _fetch(url: str, out: IO[bytes], progress: bool, name: str = ARCHIVE_NAME) -> str:
    """Stream ``url`` into ``out``; return the md5 of what was written."""
    try:
        response = urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S)  # noqa: S310 - file:// is wanted
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # an HTTP error status still holds the open connection
        raise _network_error(url, exc) from exc
    digest = hashlib.md5(usedforsecurity=False)
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _network_error(url, exc) from exc
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def download(
    url: str = CIFAR10_URL,
    dest_dir: Path | None = None,
    md5: str = CIFAR10_MD5,
    progress: bool = True,
    filename: str = ARCHIVE_NAME,
) -> Path:
    """Download ``url`` into ``dest_dir/filename`` (default: the CIFAR-10 archive in :func:`cache_dir`).

    A file already there with the right md5 is reused; one with a wrong md5 is
    replaced. The data go to a temporary file in the same folder and are renamed
    into place only after the md5 matches, so an interrupted or corrupt download
    never leaves a file that looks complete.
    """
    dest_dir = Path(dest_dir) if dest_dir is not None else cache_dir()
    target = dest_dir / filename
    if target.is_file() and md5sum(target) == md5:
        return target
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.", suffix=".part")
    except OSError as exc:
        raise DataError(f"cannot write to {dest_dir} ({exc.strerror or exc}); set $CIFARLAB_CACHE to a writable folder") from exc
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                actual = _fetch(url, out, progress, filename)
        except OSError as exc:  # network errors were already turned into DataError
            raise DataError(f"cannot write {tmp} ({exc.strerror or exc})") from exc
        if actual != md5:
            raise DataError(f"{url}: checksum mismatch: expected md5 {md5}, got {actual} (incomplete or altered download)")
        os.replace(tmp, target)
    except BaseException:  # includes Ctrl-C: never leave a partial file behind
        tmp.unlink(missing_ok=True)
        raise
    return target


# --------------------------------------------------------------------------- members


class Members:
    """The files of an official archive by base name, wherever they sit in it: members of a tar (any
    compression, read in place, nothing extracted) or files of a folder. A file stored gzipped
    (``name.gz``, as MNIST's are) reads as ``name``."""

    def __init__(self, where: Path, files: dict[str, bytes | Path]) -> None:
        self.where = where  # the archive or folder, for messages
        self.files = files

    def _key(self, name: str) -> str:
        return name if name in self.files else f"{name}.gz"

    def has(self, name: str) -> bool:
        return self._key(name) in self.files

    def label(self, name: str) -> str:
        """Where ``name`` is, for messages: its file, or ``archive:member``."""
        loc = self.files.get(self._key(name))
        return str(loc) if isinstance(loc, Path) else f"{self.where}:{self._key(name)}"

    def read(self, name: str) -> bytes:
        key = self._key(name)
        loc = self.files[key]
        try:
            blob = loc.read_bytes() if isinstance(loc, Path) else loc
            return blob if key == name else gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{self.label(name)}: cannot read ({type(exc).__name__}: {exc})") from None

    def head(self, name: str, n: int) -> bytes:
        """The first ``n`` bytes of a file stored as it is (not gzipped); b'' when it cannot be read."""
        loc = self.files.get(name)
        if isinstance(loc, Path):
            try:
                with open(loc, "rb") as f:
                    return f.read(n)
            except OSError:
                return b""
        return (loc or b"")[:n]

    def entries(self, names: Sequence[str]) -> list[tuple[str, int, int]]:
        """(file, size, mtime) of the folder files ``names`` are read from, for the decode cache's fingerprint."""
        out = []
        for name in names:
            loc = self.files[self._key(name)]
            if isinstance(loc, Path):
                st = loc.stat()
                out.append((str(loc.resolve()), st.st_size, st.st_mtime_ns))
        return out


def _unpickle(m: Members, name: str) -> object:
    return _load_pickle_stream(io.BytesIO(m.read(name)), m.label(name))


# --------------------------------------------------------------------------- decoders, one per format


def _get(d: Mapping[Any, Any], key: str, source: str, what: str = "a CIFAR-10 batch") -> Any:
    """``d[b'key']``, also accepting str keys (batches re-pickled under Python 3)."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{source}: no {key!r} entry; not {what}")


def _decode_batch(obj: object, source: str, labels_key: str = "labels", what: str = "a CIFAR-10 batch"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Turn an unpickled CIFAR batch into (N, 32, 32, 3) uint8 images and int64 labels (``labels_key``)."""
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a dict, found {type(obj).__name__}; not {what}")
    data = _get(obj, "data", source, what)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_LEN:
        shape = getattr(data, "shape", None)
        raise DataError(f"{source}: 'data' must be a uint8 array of shape (N, {_ROW_LEN}), found {type(data).__name__} {shape}")
    try:
        labels = np.asarray(_get(obj, labels_key, source, what), dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{source}: {labels_key!r} must be a list of integers ({exc})") from exc
    if labels.shape != (len(data),):
        raise DataError(f"{source}: {len(data)} images but labels of shape {labels.shape}")
    # Rows are planes R, G, B of 32x32 pixels each, row-major.
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _decode_meta(obj: object, source: str, key: str = "label_names") -> list[str]:
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a dict, found {type(obj).__name__}; not CIFAR metadata")
    names = _get(obj, key, source, "CIFAR metadata")
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{source}: {key!r} must be a non-empty list of strings")
    try:
        return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: label names are not valid text ({exc})") from exc


# A decoder returns (train_x, train_y, test_x, test_y, classes): NHWC uint8 RGB images, int64 labels.
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]


def _cifar10(m: Members, _: str) -> Decoded:
    train = [_decode_batch(_unpickle(m, n), m.label(n)) for n in TRAIN_BATCHES]
    test_x, test_y = _decode_batch(_unpickle(m, TEST_BATCH), m.label(TEST_BATCH))
    classes = _decode_meta(_unpickle(m, META_FILE), m.label(META_FILE))
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y, classes


def _cifar100(m: Members, key: str) -> Decoded:
    """``key`` 'fine' (100 classes) or 'coarse' (20 superclasses): both label sets are in every batch."""
    what = "a CIFAR-100 batch"
    tx, ty = _decode_batch(_unpickle(m, "train"), m.label("train"), f"{key}_labels", what)
    sx, sy = _decode_batch(_unpickle(m, "test"), m.label("test"), f"{key}_labels", what)
    return tx, ty, sx, sy, _decode_meta(_unpickle(m, "meta"), m.label("meta"), f"{key}_label_names")


def _gray_to_rgb(x: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, H, W, 3): every source gives RGB; a gray image is the same in each channel."""
    return np.ascontiguousarray(np.repeat(x[..., None], 3, axis=-1))


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_CLASSES = {"mnist": list(tvd.MNIST.classes), "fashion-mnist": list(tvd.FashionMNIST.classes)}


def _idx(m: Members, names: str) -> Decoded:
    """MNIST's IDX files through torchvision's parser. ``names``: 'mnist' or 'fashion-mnist' (the class names of
    that set), or 'digits': the classes named by their numbers, for any set in the format (EMNIST's too)."""

    def read(name: str, reader: Callable[[str], Any]) -> np.ndarray:
        blob = m.read(name)
        with tempfile.TemporaryDirectory(prefix="cifarlab-idx-") as tmp:  # torchvision's reader takes a file name
            f = Path(tmp) / name
            f.write_bytes(blob)
            try:
                return reader(str(f)).numpy()
            except (RuntimeError, ValueError, AssertionError, TypeError, KeyError) as exc:
                raise DataError(f"{m.label(name)}: not an IDX file ({type(exc).__name__}: {exc})") from None

    tx, ty, sx, sy = (read(n, read_label_file if "labels" in n else read_image_file) for n in IDX_FILES)
    ty, sy = ty.astype(np.int64), sy.astype(np.int64)
    classes = IDX_CLASSES.get(names) or [str(i) for i in range(int(max(ty.max(), sy.max())) + 1)]
    return _gray_to_rgb(tx), ty, _gray_to_rgb(sx), sy, classes


SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def _svhn(m: Members, _: str) -> Decoded:
    import scipy.io as sio  # start-up cost (SciPy's io); only SVHN needs it

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        blob = m.read(name)
        try:
            mat = sio.loadmat(io.BytesIO(blob))  # MATLAB v5, as torchvision's SVHN reads it: arrays only, no code
            x, y = mat["X"], mat["y"].astype(np.int64).reshape(-1)
        except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
            raise DataError(f"{m.label(name)}: not an SVHN .mat file ({type(exc).__name__}: {exc})") from None
        if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != len(y):
            raise DataError(f"{m.label(name)}: 'X' must be (H, W, 3, N) for N labels, found {x.shape}")
        np.place(y, y == 10, 0)  # SVHN writes the digit 0 as class 10 (torchvision does the same)
        return np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2)).astype(np.uint8)), y  # (H, W, 3, N) -> NHWC

    (tx, ty), (sx, sy) = split(SVHN_FILES[0]), split(SVHN_FILES[1])
    return tx, ty, sx, sy, [str(i) for i in range(10)]


STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", tvd.STL10.class_names_file)


def _stl10(m: Members, _: str) -> Decoded:
    def images(name: str) -> np.ndarray:
        b = m.read(name)
        if len(b) % (3 * 96 * 96):
            raise DataError(f"{m.label(name)}: {len(b)} bytes is not a whole number of 3x96x96 images")
        # Column-major planes, as torchvision's STL10 reads them: (N, 3, W, H) -> NHWC
        return np.ascontiguousarray(np.frombuffer(b, np.uint8).reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1))

    def labels(name: str) -> np.ndarray:
        return np.frombuffer(m.read(name), np.uint8).astype(np.int64) - 1  # 1-based on disk

    try:
        classes = m.read(tvd.STL10.class_names_file).decode().split()
    except UnicodeDecodeError as exc:
        raise DataError(f"{m.label(tvd.STL10.class_names_file)}: not text ({exc})") from None
    return images("train_X.bin"), labels("train_y.bin"), images("test_X.bin"), labels("test_y.bin"), classes


# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Format:
    """An official archive format: the files it holds (by base name) and how to decode them."""

    title: str
    files: tuple[str, ...]  # base names, all needed (``name.gz`` counts as ``name``)
    decode: Callable[[Members, str], Decoded]
    default: str  # the decoder's choice of labels when data.labels is unset
    labels: dict[str, str] = field(default_factory=dict)  # data.labels values it takes -> the decoder's choice
    # (file, its first bytes): names as common as CIFAR-100's train / test / meta count only with it
    signature: tuple[str, bytes] | None = None

    def present(self, m: Members) -> list[str]:
        if self.signature and not m.head(self.signature[0], len(self.signature[1])) == self.signature[1]:
            return []
        return [n for n in self.files if m.has(n)]

    def complete(self, m: Members) -> bool:
        return len(self.present(m)) == len(self.files)

    def choice(self, labels: str | None, where: Path) -> str:
        """The decoder's choice for ``data.labels`` (a named set sharing this format, or a short form)."""
        if not labels:
            return self.default
        if labels.strip().lower() in self.labels:
            return self.labels[labels.strip().lower()]
        takes = (f"it takes data.labels={' or '.join(self.labels)}" if len(set(self.labels.values())) > 1
                 else "it has one set of labels: leave data.labels unset")
        raise DataError(f"{where}: data.labels={labels!r} does not apply to {self.title}; {takes}")


# Keyed by the named set (or family) each is the official format of; see cifarlab.data.named.
FORMATS: dict[str, Format] = {
    "cifar10": Format("the CIFAR-10 python archive", REQUIRED_FILES, _cifar10, "cifar10", {"cifar10": "cifar10"}),
    "cifar100": Format("the CIFAR-100 python archive", ("train", "test", "meta"), _cifar100, "fine",
                       {"cifar100": "fine", "fine": "fine", "cifar100-coarse": "coarse", "coarse": "coarse"},
                       signature=("meta", b"\x80")),  # a pickle (protocol 2+)
    "idx": Format("MNIST-format IDX files", IDX_FILES, _idx, "digits",
                  {"mnist": "mnist", "fashion-mnist": "fashion-mnist"}),
    "svhn": Format("SVHN's .mat files", SVHN_FILES, _svhn, "svhn", {"svhn": "svhn"}),
    "stl10": Format("the STL-10 binary archive", STL10_FILES, _stl10, "stl10", {"stl10": "stl10"}),
}

# A file by path with the official archive's name must be the official file: its md5 is checked on decode.
OFFICIAL_MD5 = {ARCHIVE_NAME: CIFAR10_MD5, tvd.CIFAR100.filename: tvd.CIFAR100.tgz_md5,
                tvd.STL10.filename: tvd.STL10.tgz_md5}

ACCEPTED = ("--data takes a data set name, an image folder (a labels file's with --labels), or the official "
            "archive or extracted folder of CIFAR-10 (data_batch_1..5, test_batch, batches.meta), CIFAR-100 "
            "(train, test, meta), MNIST or Fashion-MNIST (the four IDX files), SVHN (train_32x32.mat, "
            "test_32x32.mat) or STL-10 (stl10_binary: train_X.bin, ...)")


# --------------------------------------------------------------------------- recognizing what a path holds

_LISTED = 64  # entries read per subfolder: an official folder holds a handful; class folders are not read through


def _files_in(d: Path, limit: int | None) -> dict[str, Path]:
    out: dict[str, Path] = {}
    try:
        with os.scandir(d) as it:
            for i, e in enumerate(it):
                if limit is not None and i >= limit:
                    break
                if not e.name.startswith(".") and e.is_file():
                    out[e.name] = Path(e.path)
    except OSError:
        pass  # an unreadable subfolder holds nothing we can use
    return out


def _subfolders(p: Path) -> list[Path]:
    try:
        with os.scandir(p) as it:
            return sorted(Path(e.path) for e in it if not e.name.startswith(".") and e.is_dir())[:_LISTED]
    except OSError:
        return []


def _lacks(where: Path, fmt: Format, m: Members) -> DataError:
    have = fmt.present(m)
    missing = [n for n in fmt.files if n not in have]
    return DataError(f"{where}: holds {', '.join(have)} of {fmt.title} but lacks {', '.join(missing)}")


def find_in_folder(p: Path) -> tuple[Format, Members] | None:
    """The official format a folder holds, itself or in a subfolder (an extracted ``cifar-10-batches-py/``,
    ``cifar-100-python/``, ``stl10_binary/`` ...); None when it holds no format's files.

    Raises a DataError for a folder holding part of one format only, or whole copies of several.
    """
    complete: list[tuple[Path, Format, Members]] = []
    partial: list[tuple[Path, Format, Members]] = []
    for d in [p, *_subfolders(p)]:
        m = Members(d, _files_in(d, None if d == p else _LISTED))
        for fmt in FORMATS.values():
            if fmt.complete(m):
                complete.append((d, fmt, m))
            elif fmt.present(m):
                partial.append((d, fmt, m))
        if d == p and complete:  # the folder itself wins over its subfolders
            break
    if len(complete) > 1:
        found = "; ".join(f"{fmt.title} in {d}" for d, fmt, _ in complete)
        raise DataError(f"{p} holds several data sets ({found}): give --data one of those folders")
    if complete:
        return complete[0][1], complete[0][2]
    if partial:
        d, fmt, m = partial[0]
        raise _lacks(d, fmt, m)
    return None


def _tar_members(path: Path) -> tuple[Members, list[str], int]:
    """One pass over a tar: the files any format needs, read until one format has them all; also up to three
    other member names and the number of files seen, for the message when no format matches."""
    wanted = {n for fmt in FORMATS.values() for n in fmt.files}
    wanted |= {f"{n}.gz" for n in wanted}
    m = Members(path, {})
    others: list[str] = []
    n_files = 0
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                n_files += 1
                base = member.name.rstrip("/").rsplit("/", 1)[-1]
                if base not in wanted or base in m.files:
                    if len(others) < 3:
                        others.append(member.name)
                    continue
                stream = tar.extractfile(member)
                # Read the member fully so a truncated archive fails here, as a DataError.
                m.files[base] = stream.read() if stream is not None else b""
                if any(fmt.complete(m) for fmt in FORMATS.values()):
                    break  # STL-10's 2.7 GB of unlabelled images come after the files it needs
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise DataError(f"{path}: not a readable tar archive ({type(exc).__name__}: {exc})") from exc
    return m, others, n_files


def _describe(path: Path) -> str:
    """What a file that is no tar archive looks like, from its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip file (unpack it and give the folder)"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file holding no tar archive (one of MNIST's IDX files? give the folder holding all four)"
    if head.startswith(b"MATLAB"):
        return "one MATLAB file (SVHN? give the folder holding train_32x32.mat and test_32x32.mat)"
    if head.startswith(b"\x00\x00\x08"):
        return "one IDX file (give the folder holding all four)"
    if head.startswith(b"\x80"):
        return "one pickle (a CIFAR batch? give the whole archive or its extracted folder)"
    if all(32 <= c < 127 or c in b"\t\r\n" for c in head):
        return "a text file (a labels file? give it as --labels and the images' folder as --data)"
    return "a file of unknown type"


def _require_tar(path: Path) -> None:
    try:
        is_tar = tarfile.is_tarfile(path)  # reads the first member's header only
    except OSError:
        is_tar = False  # _describe names the reason
    if not is_tar:
        raise DataError(f"{path}: {_describe(path)}, not an archive of a known data set; {ACCEPTED}")


def recognize(path: Path | str) -> tuple[Format, Members]:
    """The official format an archive file or folder holds, from its contents (never from its name)."""
    path = Path(path)
    if path.is_dir():
        found = find_in_folder(path)
        if found is None:
            names = sorted(_files_in(path, _LISTED))[:3] or [d.name + "/" for d in _subfolders(path)[:3]]
            raise DataError(f"{path}: no data set's files found (found {', '.join(names) or 'nothing'}); {ACCEPTED}")
        return found
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    _require_tar(path)
    m, others, n_files = _tar_members(path)
    for fmt in FORMATS.values():
        if fmt.complete(m):
            return fmt, m
    for fmt in FORMATS.values():
        if fmt.present(m):
            raise _lacks(path, fmt, m)
    shown = ", ".join(others) + (", ..." if n_files > len(others) else "")
    files = f"{n_files} file{'' if n_files == 1 else 's'}" + (f" ({shown})" if shown else "")
    raise DataError(f"{path}: a tar archive of {files}, none of them a data set's; {ACCEPTED}")


# --------------------------------------------------------------------------- loading by path


def _check_md5(path: Path, md5: str) -> None:
    actual = md5sum(path)
    if actual != md5:
        raise DataError(
            f"{path}: checksum mismatch: expected md5 {md5}, got {actual} (a truncated download or a different file; "
            f"give an archive of your own another name)"
        )


def load_official(path: Path | str, labels: str | None = None, md5: str | None = None) -> RawData:
    """Decode the official archive of a named set, or its extracted folder, recognized from what it holds.

    ``labels`` (``data.labels``) picks the label set where sets share a format: a CIFAR-100 archive gives its
    100 fine classes unless ``cifar100-coarse`` (or ``coarse``) asks for the 20 superclasses; IDX files give
    classes named by their numbers unless ``mnist`` or ``fashion-mnist`` names them. ``md5`` checks an
    archive file first; by default a file with an official archive's name is checked against that archive's.
    """
    path = Path(path)
    md5 = md5 or (OFFICIAL_MD5.get(path.name) if path.is_file() else None)
    if md5:  # first: a truncated download is named as such, not as a damaged tar
        _check_md5(path, md5)
    fmt, m = recognize(path)  # raises for a missing path
    choice = fmt.choice(labels, path)
    tx, ty, sx, sy, classes = fmt.decode(m, choice)
    several = len({fmt.default, *fmt.labels.values()}) > 1
    layout = f"{fmt.title}, {choice} labels" if several else fmt.title
    return RawData(tx, ty, sx, sy, classes, source=str(path), info={"layout": layout}).check()


def load_official_cached(path: Path | str, labels: str | None = None, md5: str | None = None,
                         source: str | None = None) -> RawData:
    """:func:`load_official` through the decode cache (a changed file or other labels decode again);
    ``source`` names the data in place of the path (a named set's name)."""
    path = Path(path)
    if path.is_dir():
        fmt, m = recognize(path)
        entries = m.entries(fmt.files)
    elif path.is_file():
        st = path.stat()
        entries = [(str(path.resolve()), st.st_size, st.st_mtime_ns)]
    else:
        raise DataError(f"{path}: no such file or folder")
    fp = fingerprint(entries, kind="official", labels=labels or "")
    # Each label set of one archive is cached apart, so switching between them does not decode again.
    key = Path(f"{path}#{labels}") if labels else path
    raw = cached(key, fp, lambda: load_official(path, labels, md5))
    return dataclasses.replace(raw, source=source) if source else raw


def load_archive(path: Path | str, verify_md5: bool = False) -> RawData:
    """Decode the official CIFAR-10 python data from a ``.tar.gz`` or an extracted folder.

    ``path`` is the archive itself (read in place), a ``cifar-10-batches-py/``
    folder, or a folder containing one. ``verify_md5`` checks an archive file
    against :data:`CIFAR10_MD5` first (folders have no reference checksum).
    """
    path = Path(path)
    fmt = FORMATS["cifar10"]
    if path.is_dir():
        folders = [path, *_subfolders(path)]
        ms = [Members(d, _files_in(d, None if d == path else _LISTED)) for d in folders]
        best = max(range(len(ms)), key=lambda i: (len(fmt.present(ms[i])), i == 0))
        m, where = ms[best], folders[best]
    elif path.is_file():
        if verify_md5:
            _check_md5(path, CIFAR10_MD5)
        m, where = _tar_members(path)[0], path
    else:
        raise DataError(f"{path}: no such file or folder")
    if not fmt.complete(m):
        missing = [n for n in fmt.files if not m.has(n)]
        raise DataError(f"{where}: lacks {', '.join(missing)}; not a complete CIFAR-10 python archive or "
                        f"{BATCH_DIR}/ folder")
    tx, ty, sx, sy, classes = _cifar10(m, "cifar10")
    return RawData(tx, ty, sx, sy, classes, source=str(path)).check()


@register_source("archive")
def _resolve(spec: str | None, cfg) -> Source | None:
    """Any existing file (no other source reads one), and a folder holding an official format's files.
    A file's format is found when it is decoded: a tar is read through to list it."""
    if spec is None:
        return None
    p = Path(spec).expanduser()
    if p.is_file():
        _require_tar(p)  # anything else is refused here, naming what it looks like
    elif not (p.is_dir() and find_in_folder(p) is not None):
        return None
    return Source("archive", p, lambda c: load_official_cached(p, c.labels))


# --------------------------------------------------------------------------- fake archive


def encode_batch(data: np.ndarray, labels: Sequence[int], batch_label: str = "fake batch") -> bytes:
    """Pickle one batch the way the official files are laid out (protocol 2, bytes keys).

    ``data`` is uint8 (N, 3072) in the official row layout, or (N, 32, 32, 3)
    images which are converted to it.
    """
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim == 4:
        data = data.transpose(0, 3, 1, 2).reshape(len(data), _ROW_LEN)
    batch = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": np.ascontiguousarray(data),
        b"filenames": [f"fake_{i:05d}.png".encode() for i in range(len(data))],
    }
    return pickle.dumps(batch, protocol=2)


def write_fake_archive(
    path: Path | str,
    n_train_per_batch: int = 20,
    n_test: int = 20,
    seed: int = 0,
    *,
    overrides: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a small archive in the official format and return its path.

    Random images, labels cycling through the 10 classes. ``overrides`` maps a
    member name (``"data_batch_1"``, ``"batches.meta"``...) to the raw bytes to
    store instead, for building corrupt or malicious archives in tests. The
    output is byte-for-byte deterministic for a given seed.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    offset = 0
    for i, name in enumerate(TRAIN_BATCHES, start=1):
        data = rng.integers(0, 256, size=(n_train_per_batch, _ROW_LEN), dtype=np.uint8)
        labels = [(offset + j) % len(CIFAR10_CLASSES) for j in range(n_train_per_batch)]
        members[name] = encode_batch(data, labels, f"training batch {i} of 5")
        offset += n_train_per_batch
    data = rng.integers(0, 256, size=(n_test, _ROW_LEN), dtype=np.uint8)
    members[TEST_BATCH] = encode_batch(data, [j % len(CIFAR10_CLASSES) for j in range(n_test)], "testing batch 1 of 1")
    meta = {
        b"num_cases_per_batch": n_train_per_batch,
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_vis": _ROW_LEN,
    }
    members[META_FILE] = pickle.dumps(meta, protocol=2)
    members.update(overrides or {})

    path.parent.mkdir(parents=True, exist_ok=True)
    # A fixed gzip mtime, no file name in the gzip header and fixed tar mtimes
    # keep the bytes (and the md5) the same across runs and output paths.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            folder = tarfile.TarInfo(BATCH_DIR)
            folder.type, folder.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(folder)
            for name, blob in members.items():
                info = tarfile.TarInfo(f"{BATCH_DIR}/{name}")
                info.size, info.mode = len(blob), 0o644
                tar.addfile(info, io.BytesIO(blob))
    return path
