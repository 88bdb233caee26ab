"""The official CIFAR-10 python archive: download, verify, and decode safely.

The official batches are Python 2 pickles, and unpickling runs whatever
callables a pickle names, so a tampered or mistaken file could run code.
:class:`RestrictedUnpickler` therefore allows only the handful of globals that
rebuilding a numpy array needs; everything else is refused with a
:class:`~cifarlab.errors.DataError`.

Layout of the archive (``cifar-10-python.tar.gz``)::

    cifar-10-batches-py/data_batch_1 .. data_batch_5   10000 training images each
    cifar-10-batches-py/test_batch                     10000 test images
    cifar-10-batches-py/batches.meta                   b'label_names'

Each batch is a dict with bytes keys: ``b'data'`` a uint8 array (N, 3072) whose
rows hold the 32x32 red plane, then green, then blue, row-major; and
``b'labels'`` a list of ints.
"""

from __future__ import annotations

import codecs
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from ..errors import DataError
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


# --------------------------------------------------------------------------- decoding


def _get(d: Mapping[Any, Any], key: str, source: str) -> Any:
    """``d[b'key']``, also accepting str keys (batches re-pickled under Python 3)."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{source}: no {key!r} entry; not a CIFAR-10 batch")


def _decode_batch(obj: object, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Turn an unpickled batch into (N, 32, 32, 3) uint8 images and int64 labels."""
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a dict, found {type(obj).__name__}; not a CIFAR-10 batch")
    data = _get(obj, "data", source)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_LEN:
        shape = getattr(data, "shape", None)
        raise DataError(f"{source}: 'data' must be a uint8 array of shape (N, {_ROW_LEN}), found {type(data).__name__} {shape}")
    try:
        labels = np.asarray(_get(obj, "labels", source), dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{source}: 'labels' must be a list of integers ({exc})") from exc
    if labels.shape != (len(data),):
        raise DataError(f"{source}: {len(data)} images but labels of shape {labels.shape}")
    # Rows are planes R, G, B of 32x32 pixels each, row-major.
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _decode_meta(obj: object, source: str) -> list[str]:
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a dict, found {type(obj).__name__}; not CIFAR-10 metadata")
    names = _get(obj, "label_names", source)
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{source}: 'label_names' must be a non-empty list of strings")
    try:
        return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: label names are not valid text ({exc})") from exc


def _read_tar_members(path: Path) -> dict[str, object]:
    """Unpickle the required members of a tar(.gz) straight from the archive, without extracting."""
    found: dict[str, object] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            members: dict[str, tarfile.TarInfo] = {}
            for member in tar:
                base = member.name.rstrip("/").rsplit("/", 1)[-1]
                if member.isfile() and base in REQUIRED_FILES and base not in members:
                    members[base] = member
            missing = [n for n in REQUIRED_FILES if n not in members]
            if missing:
                raise DataError(f"{path}: archive lacks {', '.join(missing)}; not a complete CIFAR-10 python archive")
            for base, member in members.items():
                stream = tar.extractfile(member)
                if stream is None:  # pragma: no cover - isfile() members always have data
                    raise DataError(f"{path}: cannot read {member.name}")
                # Read the member fully so a truncated archive fails here, as a DataError.
                raw = stream.read()
                found[base] = _load_pickle_stream(io.BytesIO(raw), f"{path}:{member.name}")
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile, ValueError) as exc:
        raise DataError(f"{path}: not a readable tar.gz archive ({type(exc).__name__}: {exc})") from exc
    return found


def _batch_folder(path: Path) -> Path:
    """The ``cifar-10-batches-py`` folder: ``path`` itself or its child."""
    if (path / TRAIN_BATCHES[0]).exists() or path.name == BATCH_DIR:
        return path
    if (path / BATCH_DIR).is_dir():
        return path / BATCH_DIR
    raise DataError(f"{path}: neither a {BATCH_DIR}/ folder nor a folder containing one")


def _read_folder(path: Path) -> dict[str, object]:
    folder = _batch_folder(path)
    missing = [n for n in REQUIRED_FILES if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}; not a complete {BATCH_DIR}/ folder")
    return {n: safe_load_pickle(folder / n) for n in REQUIRED_FILES}


def load_archive(path: Path | str, verify_md5: bool = False) -> RawData:
    """Decode the official CIFAR-10 python data from a ``.tar.gz`` or an extracted folder.

    ``path`` is the archive itself (read in place), a ``cifar-10-batches-py/``
    folder, or a folder containing one. ``verify_md5`` checks an archive file
    against :data:`CIFAR10_MD5` first (folders have no reference checksum).
    """
    path = Path(path)
    if path.is_dir():
        parts = _read_folder(path)
    elif path.is_file():
        if verify_md5:
            actual = md5sum(path)
            if actual != CIFAR10_MD5:
                raise DataError(
                    f"{path}: checksum mismatch: expected md5 {CIFAR10_MD5}, got {actual} (a truncated download or a different file; "
                    f"give an archive of your own another name)"
                )
        parts = _read_tar_members(path)
    else:
        raise DataError(f"{path}: no such file or folder")

    train = [_decode_batch(parts[n], f"{path}:{n}") for n in TRAIN_BATCHES]
    test_x, test_y = _decode_batch(parts[TEST_BATCH], f"{path}:{TEST_BATCH}")
    classes = _decode_meta(parts[META_FILE], f"{path}:{META_FILE}")
    return RawData(
        train_x=np.concatenate([x for x, _ in train]),
        train_y=np.concatenate([y for _, y in train]),
        test_x=test_x,
        test_y=test_y,
        classes=classes,
        source=str(path),
    ).check()


def load_archive_cached(path: Path) -> RawData:
    """:func:`load_archive` through the decode cache; a file with the official name is md5-checked."""
    from .cache import cached, fingerprint

    st = path.stat()
    fp = fingerprint([(str(path.resolve()), st.st_size, st.st_mtime_ns)], kind="archive", size=IMAGE_SIZE)
    # A file with the official name must be the official file: its md5 (~0.5 s) is checked whenever it is
    # decoded, i.e. once per new or changed file (a decoded cache hit skips it). Other names are own archives.
    official = path.is_file() and path.name == ARCHIVE_NAME
    return cached(path, fp, lambda: load_archive(path, verify_md5=official))


@register_source("archive")
def _resolve(spec: str | None, cfg) -> Source | None:
    if spec is None:
        return None
    p = Path(spec).expanduser()
    is_archive = (p.is_file() and p.name.endswith((".tar.gz", ".tgz"))) or (
        p.is_dir() and ((p / TRAIN_BATCHES[0]).exists() or (p / BATCH_DIR).is_dir()))
    return Source("archive", p, lambda c: load_archive_cached(p), name="cifar10") if is_archive else None


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
