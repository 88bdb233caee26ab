"""The official CIFAR-10 archive: decoding, pixel layout, download, and unpickling safety."""

from __future__ import annotations

import builtins
import codecs
import functools
import http.server
import os
import pickle
import struct
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cifarlab.data.archive import (
    ARCHIVE_NAME,
    encode_batch,
    download,
    load_archive,
    md5sum,
    safe_load_pickle,
    write_fake_archive,
)
from cifarlab.errors import DataError


@pytest.fixture()
def fake(tmp_path: Path) -> Path:
    return write_fake_archive(tmp_path / "src" / ARCHIVE_NAME)


def _extract(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


class _Reduce:
    """Pickles as a call of ``func(*args)``, as a malicious file would."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


def _py2_style_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2 cPickle + numpy 1.x wrote the official files (protocol 2, byte strings)."""

    def short(b: bytes) -> bytes:  # SHORT_BINSTRING: a py2 str, loaded as bytes
        return b"U" + bytes([len(b)]) + b

    def i32(n: int) -> bytes:  # BININT
        return b"J" + struct.pack("<i", n)

    raw = data.tobytes()
    dtype = b"cnumpy\ndtype\n" + short(b"u1") + i32(0) + i32(1) + b"\x87R"
    dtype += b"(" + i32(3) + short(b"|") + b"NNN" + i32(-1) + i32(-1) + i32(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + i32(0) + b"\x85" + short(b"b") + b"\x87R"
    array += b"(" + i32(1) + i32(data.shape[0]) + i32(data.shape[1]) + b"\x86" + dtype
    array += b"\x89" + b"T" + struct.pack("<I", len(raw)) + raw + b"tb"
    label_list = b"](" + b"".join(i32(v) for v in labels) + b"e"
    return b"\x80\x02}(" + short(b"data") + array + short(b"labels") + label_list + b"u."


# --------------------------------------------------------------------------- decoding


def test_fake_archive_round_trip_tar_and_folder(fake: Path, tmp_path: Path) -> None:
    from_tar = load_archive(fake)
    assert from_tar.train_x.shape == (100, 32, 32, 3) and from_tar.train_x.dtype == np.uint8
    assert from_tar.test_x.shape == (20, 32, 32, 3)
    assert from_tar.train_y.dtype == np.int64 and from_tar.test_y.dtype == np.int64
    assert from_tar.train_y.min() >= 0 and from_tar.train_y.max() < 10
    assert from_tar.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert all(isinstance(c, str) for c in from_tar.classes)
    assert from_tar.source == str(fake)

    extracted = _extract(fake, tmp_path / "x")
    for folder in (extracted, extracted / "cifar-10-batches-py"):  # containing folder, or the folder itself
        from_dir = load_archive(folder)
        for name in ("train_x", "train_y", "test_x", "test_y"):
            np.testing.assert_array_equal(getattr(from_dir, name), getattr(from_tar, name))
        assert from_dir.classes == from_tar.classes


def test_fake_archive_is_deterministic(tmp_path: Path) -> None:
    a = write_fake_archive(tmp_path / "a.tar.gz", seed=3)
    b = write_fake_archive(tmp_path / "b.tar.gz", seed=3)
    assert md5sum(a) == md5sum(b)
    assert md5sum(a) != md5sum(write_fake_archive(tmp_path / "c.tar.gz", seed=4))


def test_pixel_layout_r_then_g_then_b_planes(tmp_path: Path) -> None:
    data = np.zeros((20, 3072), np.uint8)
    data[0, 0] = 255  # R plane, pixel (0, 0)
    data[0, 1024 + 1 * 32 + 2] = 7  # G plane, row 1, column 2
    data[3, 2048 + 31 * 32 + 30] = 9  # B plane, row 31, column 30
    archive = write_fake_archive(tmp_path / "a.tar.gz", overrides={"data_batch_1": encode_batch(data, [0] * 20)})
    x = load_archive(archive).train_x
    assert x[0, 0, 0, 0] == 255 and x[0, 0, 0, 1:].sum() == 0
    assert x[0, 1, 2, 1] == 7
    assert x[3, 31, 30, 2] == 9
    assert int(x[:20].sum()) == 255 + 7 + 9


def test_encode_batch_accepts_images_and_round_trips(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    archive = write_fake_archive(tmp_path / "a.tar.gz", overrides={"test_batch": encode_batch(images, [i % 10 for i in range(20)])})
    raw = load_archive(archive)
    np.testing.assert_array_equal(raw.test_x, images)
    np.testing.assert_array_equal(raw.test_y, np.arange(20) % 10)


def test_python2_style_batch_loads(tmp_path: Path) -> None:
    # The real files were written by Python 2 numpy: byte strings, numpy.core.multiarray.
    data = np.random.default_rng(1).integers(0, 256, (20, 3072), dtype=np.uint8)
    labels = [i % 10 for i in range(20)]
    archive = write_fake_archive(tmp_path / "a.tar.gz", overrides={"data_batch_2": _py2_style_batch(data, labels)})
    raw = load_archive(archive)
    np.testing.assert_array_equal(raw.train_x[20:40], data.reshape(20, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(raw.train_y[20:40], labels)


def test_missing_batches_named(fake: Path, tmp_path: Path) -> None:
    folder = _extract(fake, tmp_path / "x") / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    (folder / "batches.meta").unlink()
    with pytest.raises(DataError, match="data_batch_3.*batches.meta"):
        load_archive(folder)

    with tarfile.open(tmp_path / "partial.tar.gz", "w:gz") as tar:
        tar.add(folder / "data_batch_1", arcname="cifar-10-batches-py/data_batch_1")
    with pytest.raises(DataError, match="test_batch"):
        load_archive(tmp_path / "partial.tar.gz")

    with pytest.raises(DataError, match="no such file"):
        load_archive(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_archive(tmp_path / "empty")


def test_verify_md5(fake: Path) -> None:
    load_archive(fake)  # no check by default
    with pytest.raises(DataError, match="checksum mismatch"):
        load_archive(fake, verify_md5=True)


# --------------------------------------------------------------------------- corrupt and malicious files


def test_truncated_and_garbage_batches_are_data_errors(fake: Path, tmp_path: Path) -> None:
    folder = _extract(fake, tmp_path / "x") / "cifar-10-batches-py"
    batch = folder / "data_batch_1"
    blob = batch.read_bytes()
    batch.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="data_batch_1"):
        load_archive(folder)
    batch.write_bytes(b"\x00garbage, not a pickle")
    with pytest.raises(DataError, match="data_batch_1"):
        load_archive(folder)
    batch.write_bytes(pickle.dumps([1, 2, 3], protocol=2))  # valid pickle, wrong content
    with pytest.raises(DataError, match="not a CIFAR-10 batch"):
        load_archive(folder)

    archive = write_fake_archive(tmp_path / "t.tar.gz", overrides={"test_batch": blob[:100]})
    with pytest.raises(DataError, match="test_batch"):
        load_archive(archive)

    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(fake.read_bytes()[: fake.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.tar.gz"):
        load_archive(truncated)
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not an archive at all")
    with pytest.raises(DataError, match="garbage.tar.gz"):
        load_archive(garbage)


def test_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(DataError, match=r"evil\.pkl: refusing to unpickle (posix|nt)\.system"):
        safe_load_pickle(evil)
    assert not marker.exists()


def test_unpickler_refuses_eval_and_other_codecs(tmp_path: Path) -> None:
    evil = tmp_path / "eval.pkl"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # protocol 2 spells it __builtin__.eval
        evil.write_bytes(pickle.dumps(_Reduce(builtins.eval, "__import__('os').getpid()"), protocol=protocol))
        with pytest.raises(DataError, match=r"refusing to unpickle (__builtin__|builtins)\.eval"):
            safe_load_pickle(evil)
    # _codecs.encode is allowed (protocol-2 bytes need it) but only for latin-1.
    rot = tmp_path / "rot.pkl"
    rot.write_bytes(pickle.dumps(_Reduce(codecs.encode, "abc", "rot13"), protocol=2))
    with pytest.raises(DataError, match="rot.pkl"):
        safe_load_pickle(rot)
    with pytest.raises(DataError, match="cannot read"):
        safe_load_pickle(tmp_path / "missing.pkl")


def test_malicious_batch_inside_archive_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=2)
    archive = write_fake_archive(tmp_path / "evil.tar.gz", overrides={"data_batch_1": payload})
    with pytest.raises(DataError, match="data_batch_1: refusing to unpickle"):
        load_archive(archive)
    folder = _extract(archive, tmp_path / "x")
    with pytest.raises(DataError, match="data_batch_1: refusing to unpickle"):
        load_archive(folder)
    assert not marker.exists()


# --------------------------------------------------------------------------- download


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 serving a folder; yields (base URL, folder)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_file_url(fake: Path, tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    got = download(fake.as_uri(), dest, md5=md5sum(fake), progress=False)
    assert got == dest / ARCHIVE_NAME
    assert got.read_bytes() == fake.read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == [ARCHIVE_NAME]  # no temp file left
    assert load_archive(got).train_x.shape == (100, 32, 32, 3)


def test_download_http_skips_good_copy_and_replaces_bad(fake: Path, tmp_path: Path, http_root: tuple[str, Path]) -> None:
    base, root = http_root
    (root / "x.tar.gz").write_bytes(fake.read_bytes())
    dest, md5 = tmp_path / "cache", md5sum(fake)
    got = download(f"{base}/x.tar.gz", dest, md5=md5, progress=False)
    assert md5sum(got) == md5

    # A good copy is reused: the server no longer has the file, yet this succeeds.
    (root / "x.tar.gz").unlink()
    assert download(f"{base}/x.tar.gz", dest, md5=md5, progress=False) == got

    # A corrupt copy is downloaded again.
    got.write_bytes(b"corrupt")
    (root / "x.tar.gz").write_bytes(fake.read_bytes())
    assert md5sum(download(f"{base}/x.tar.gz", dest, md5=md5, progress=False)) == md5
    assert sorted(p.name for p in dest.iterdir()) == [ARCHIVE_NAME]


def test_download_wrong_md5_leaves_nothing(fake: Path, tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    with pytest.raises(DataError, match=f"expected md5 {'0' * 32}, got {md5sum(fake)}"):
        download(fake.as_uri(), dest, md5="0" * 32, progress=False)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/x.tar.gz", "file:///nonexistent/cifarlab/x.tar.gz", "http://127.0.0.1:{port}/missing.tar.gz"])
def test_download_unreachable_points_at_data_flag(url: str, tmp_path: Path, http_root: tuple[str, Path]) -> None:
    url = url.format(port=http_root[0].rsplit(":", 1)[1])
    dest = tmp_path / "cache"
    with pytest.raises(DataError, match="--data") as info:
        download(url, dest, progress=False)
    assert "CIFARLAB_DATA" in str(info.value) and "cifar-10-batches-py" in str(info.value)
    assert list(dest.iterdir()) == []
