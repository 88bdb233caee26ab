"""Data sets as people have them: folder layouts, labels files, standard data sets by name (downloaded from a
local server through the real download code), defaults that fit the data, and their bad inputs."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from . import formats
from cifarlab.cli.main import main
from cifarlab.config import DataConfig, load_config
from cifarlab.data import load_data
from cifarlab.data import named as named_sets
from cifarlab.data.archive import load_official, md5sum
from cifarlab.errors import DataError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout,n_train,n_val,n_test", [
    ("flat", 1150, 288, 359),            # test: 0.2 of 1797 carved; validation: 0.2 of the rest
    ("train-test", 1150, 287, 360),      # the given test split (every 5th image); validation carved
    ("train-val-test", 1077, 360, 360),  # all three given
    ("train-valid", 1150, 360, 287),     # validation given (as valid/); test carved from train
    ("csv", 1150, 288, 359),             # a Kaggle-style id,label file: like the flat folder
    ("csv-split", 1077, 360, 360),       # ... with a split column
])
def test_digits_in_every_layout(tmp_path, layout, n_train, n_val, n_test):
    root = formats.write_digits_layout(tmp_path / "digits", layout)
    cfg = DataConfig(path=str(root), labels=str(root / "labels.csv") if layout.startswith("csv") else None)
    data = load_data(cfg)
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (n_train, n_val, n_test)
    assert data.classes == [str(i) for i in range(10)] and data.image_size == 8  # the images' own size
    # every image in exactly one split: by pixels, allowing for the few images digits holds twice
    x, _ = formats.digits()
    duplicates = len(x) - len({img.tobytes() for img in x.reshape(len(x), -1)})
    sets = [{img.tobytes() for img in getattr(data, f"{s}_x")[:, 0].flatten(1).numpy()} for s in ("train", "val", "test")]
    assert n_train + n_val + n_test == len(x)
    assert len(sets[0] & sets[1]) + len(sets[0] & sets[2]) + len(sets[1] & sets[2]) <= duplicates
    # every split keeps every class (stratified)
    for split in ("train", "val", "test"):
        assert set(getattr(data, f"{split}_y").tolist()) == set(range(10))


def test_carved_test_split_is_seeded_and_stratified(tmp_path):
    root = formats.write_digits_layout(tmp_path / "d", "flat")
    a, b = load_data(DataConfig(path=str(root))), load_data(DataConfig(path=str(root)))
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    c = load_data(DataConfig(path=str(root), seed=1))
    assert not torch.equal(a.test_x, c.test_x)
    counts = np.bincount(a.test_y.numpy())
    assert counts.max() - counts.min() <= 2
    d = load_data(DataConfig(path=str(root), test_fraction=0.5, val_size=100))
    assert len(d.test_x) == 898 and len(d.val_x) == 100


def test_cifar_default_split_is_the_study_split():
    # 0.2 of 50,000 is the study's 10,000: the split equals the old explicit 40,000 / 10,000 counts
    from cifarlab.data.dataset import split_indices

    y = np.repeat(np.arange(10), 5000)
    old = split_indices(y, 40000, 10000, seed=0)
    cfg = DataConfig()
    new = split_indices(y, cfg.train_size, int(round(cfg.val_fraction * len(y))), cfg.seed)
    assert all(np.array_equal(o, n) for o, n in zip(old, new))


# --------------------------------------------------------------------------- named sets
@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local HTTP server standing in for the official hosts ($CIFARLAB_MIRROR); returns its folder."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("CIFARLAB_MIRROR", f"http://127.0.0.1:{server.server_port}/files")
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    (folder / "files").mkdir()
    yield folder / "files"
    server.shutdown()


def _publish(monkeypatch, name: str, folder: Path) -> None:
    """Point the named set's checksums at the files the test wrote (the official ones are of the real files)."""
    spec = named_sets.NAMED[name]
    files = tuple((url, f, md5sum(folder / f)) for url, f, _ in spec.files)
    monkeypatch.setitem(named_sets.NAMED, name, dataclasses.replace(spec, files=files))


def test_cifar100_fine_and_coarse_by_name(mirror, monkeypatch):
    written = formats.write_cifar100(mirror)
    for name in ("cifar100", "cifar100-coarse"):
        _publish(monkeypatch, name, mirror)
    fine = load_data(DataConfig(path="cifar100"))
    assert fine.num_classes == 100 and fine.classes[7] == "fine07" and fine.image_size == 32
    assert torch.equal(fine.test_x, torch.from_numpy(written["test"][0]).permute(0, 3, 1, 2))
    assert fine.test_y.tolist() == written["test"][1].tolist()
    coarse = load_data(DataConfig(path="cifar100-coarse"))
    assert coarse.num_classes == 20 and coarse.test_y.tolist() == written["test"][2].tolist()
    assert (named_sets.dataset_folder("cifar100") / "cifar-100-python.tar.gz").is_file()  # downloaded once


def test_cifar100_pickle_cannot_run_code(mirror, monkeypatch):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    formats._tar_gz(mirror / "cifar-100-python.tar.gz", {
        "cifar-100-python/train": pickle.dumps({b"data": Evil()}, protocol=2),
        "cifar-100-python/test": pickle.dumps({}, protocol=2), "cifar-100-python/meta": pickle.dumps({}, protocol=2)})
    _publish(monkeypatch, "cifar100", mirror)
    with pytest.raises(DataError, match="refusing to unpickle __builtin__.print"):
        load_data(DataConfig(path="cifar100"))


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_sets_by_name(mirror, monkeypatch, name):
    written = formats.write_mnist(mirror)
    _publish(monkeypatch, name, mirror)
    data = load_data(DataConfig(path=name))
    assert data.image_size == 28 and data.train_x.shape[1] == 3  # gray, as 3 equal channels
    x, y = written["t10k"]
    assert torch.equal(data.test_x[:, 0], torch.from_numpy(x)) and torch.equal(data.test_x[:, 2], data.test_x[:, 0])
    assert data.test_y.tolist() == y.tolist() and len(data.train_x) + len(data.val_x) == 120


def test_svhn_by_name(mirror, monkeypatch):
    written = formats.write_svhn(mirror)
    _publish(monkeypatch, "svhn", mirror)
    data = load_data(DataConfig(path="svhn"))
    x, digit = written["test"]
    assert torch.equal(data.test_x, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert data.test_y.tolist() == digit.tolist()  # the stored 10 is the digit 0


def test_stl10_by_name(mirror, monkeypatch):
    written = formats.write_stl10(mirror)
    _publish(monkeypatch, "stl10", mirror)
    data = load_data(DataConfig(path="stl10"))
    x, y = written["test"]
    assert data.image_size == 96 and data.classes[7] == "monkey"
    assert torch.equal(data.test_x, torch.from_numpy(x).permute(0, 3, 1, 2)) and data.test_y.tolist() == y.tolist()
    small = load_data(DataConfig(path="stl10", image_size=32))  # resized when asked
    assert small.image_size == 32


def test_named_download_checks_md5(mirror, monkeypatch):
    formats.write_mnist(mirror)  # checksums left at the official files': the served files do not match
    with pytest.raises(DataError, match="checksum mismatch"):
        load_data(DataConfig(path="mnist"))
    assert not any(named_sets.dataset_folder("mnist").glob("*.gz"))  # nothing half-downloaded left behind


def test_named_set_without_network_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_MIRROR", "http://127.0.0.1:9/none")  # discard port: nothing listens
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="cannot download .*train_32x32.mat"):
        load_data(DataConfig(path="svhn"))


# --------------------------------------------------------------------------- official archives by path
# Each named set's official files, given by path under names that say nothing: recognized from their contents.


def _extract(archive: Path, dest: Path) -> Path:
    import tarfile

    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def _by_path(tmp_path: Path, kind: str) -> tuple[list[Path], dict, int, int]:
    """(paths holding the set: an archive under another name and/or its extracted folder, what was written,
    training images, classes)."""
    from cifarlab.data.archive import write_fake_archive

    w = tmp_path / "written"
    if kind == "cifar10":
        archive = write_fake_archive(tmp_path / "some-batches.tgz")
        raw = load_official(archive)  # what the archive holds, to compare with
        written = {"test": (raw.test_x, raw.test_y)}
        paths, n_train, n_classes = [archive, _extract(archive, tmp_path / "x")], 100, 10
    elif kind == "cifar100":
        written = {k: (v[0], v[1]) for k, v in formats.write_cifar100(w).items()}
        archive = (w / "cifar-100-python.tar.gz").rename(tmp_path / "downloaded.bin")
        extracted = _extract(archive, tmp_path / "x") / "cifar-100-python"
        paths, n_train, n_classes = [archive, extracted.rename(tmp_path / "x" / "hundred")], 500, 100
    elif kind == "mnist":
        written = formats.write_mnist(tmp_path / "digits-idx")
        written["test"] = (np.repeat(written["t10k"][0][..., None], 3, -1), written["t10k"][1])
        paths, n_train, n_classes = [tmp_path / "digits-idx"], 120, 10
    elif kind == "svhn":
        written = formats.write_svhn(tmp_path / "house-numbers")
        paths, n_train, n_classes = [tmp_path / "house-numbers"], 100, 10
    else:  # stl10
        written = formats.write_stl10(w)
        archive = (w / "stl10_binary.tar.gz").rename(tmp_path / "pictures.tar.gz")
        paths, n_train, n_classes = [archive, _extract(archive, tmp_path / "x")], 30, 10
    return paths, written, n_train, n_classes


@pytest.mark.parametrize("kind", ["cifar10", "cifar100", "mnist", "svhn", "stl10"])
def test_official_archive_by_path_is_recognized_from_its_contents(tmp_path, kind):
    paths, written, n_train, n_classes = _by_path(tmp_path, kind)
    for path in paths:
        data = load_data(DataConfig(path=str(path), val_size=n_classes))
        assert data.num_classes == n_classes and data.channels == 3, path  # gray MNIST too: every source gives RGB
        assert len(data.train_x) + len(data.val_x) == n_train, path  # the set's own train split ...
        x, y = written["test"]
        assert np.array_equal(_nhwc(data.test_x), x) and data.test_y.tolist() == list(y), path  # ... and test split
        assert data.source == str(path)


def test_cifar100_by_path_fine_unless_coarse_is_asked(tmp_path, capsys):
    written = formats.write_cifar100(tmp_path / "w")
    archive = (tmp_path / "w" / "cifar-100-python.tar.gz").rename(tmp_path / "c100")
    fine = load_data(DataConfig(path=str(archive)))
    assert fine.num_classes == 100 and fine.classes[7] == "fine07"
    assert fine.test_y.tolist() == written["test"][1].tolist()
    for labels in ("coarse", "cifar100-coarse", "CIFAR100-Coarse"):
        coarse = load_data(DataConfig(path=str(archive), labels=labels))
        assert coarse.num_classes == 20 and coarse.classes[3] == "coarse03"
        assert coarse.test_y.tolist() == written["test"][2].tolist()
    assert load_data(DataConfig(path=str(archive))).num_classes == 100  # each label set cached apart
    assert _run(["data", "--data", str(archive), "--labels", "coarse", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "20 classes" in out and "CIFAR-100" in out and "coarse labels" in out
    with pytest.raises(DataError, match="data.labels='superclass' does not apply to the CIFAR-100 .* coarse"):
        load_data(DataConfig(path=str(archive), labels="superclass"))


def test_idx_by_path_classes_are_numbers_unless_a_set_is_named(tmp_path):
    import torchvision.datasets as tvd

    formats.write_mnist(tmp_path / "idx")
    assert load_data(DataConfig(path=str(tmp_path / "idx"))).classes == [str(i) for i in range(10)]
    streamed = load_data(DataConfig(path=str(tmp_path / "idx"), device_memory=0.01))  # over budget: streamed
    assert streamed.info["streaming"] and (streamed.channels, streamed.num_classes, streamed.image_size) == (3, 10, 28)
    fashion = load_data(DataConfig(path=str(tmp_path / "idx"), labels="fashion-mnist"))
    assert fashion.classes == list(tvd.FashionMNIST.classes)
    # uncompressed IDX files (torchvision's MNIST/raw keeps both) read the same
    import gzip

    for f in (tmp_path / "idx").glob("*.gz"):
        f.with_suffix("").write_bytes(gzip.decompress(f.read_bytes()))
        f.unlink()
    assert load_data(DataConfig(path=str(tmp_path / "idx"))).num_classes == 10
    with pytest.raises(DataError, match="does not apply to MNIST-format IDX files; it takes data.labels=mnist or "
                                        "fashion-mnist"):
        load_data(DataConfig(path=str(tmp_path / "idx"), labels="coarse"))


def test_trains_and_evaluates_on_a_cifar100_archive_by_path_with_coarse_labels(tmp_path):
    formats.write_cifar100(tmp_path / "w", n_train=200, n_test=60)
    archive = (tmp_path / "w" / "cifar-100-python.tar.gz").rename(tmp_path / "mine.tar.gz")
    out = tmp_path / "runs"
    assert _run(["train", "-c", str(REPO / "configs" / "cnn.yaml"), "--data", str(archive), "--labels", "coarse",
                 "--epochs", "1", "--out", str(out), "--name", "c", "--set", "train.device=cpu",
                 "--set", "model.widths=[4,8,8]", "--set", "model.hidden=16", "--set", "data.val_size=40"]) == 0
    cfg = load_config(out / "c" / "config.yaml")
    assert cfg.data.labels == "coarse" and cfg.data.path == str(archive)
    assert _run(["evaluate", str(out / "c")]) == 0  # reloads the same 20-class data from the saved config


def test_official_name_of_a_different_file_is_a_checksum_mismatch(tmp_path, capsys):
    # the case: a CIFAR-100 archive under its official name is read as one (here: not the official bytes)
    formats.write_cifar100(tmp_path)
    msg = _one_line_error(capsys, _train(tmp_path, tmp_path / "cifar-100-python.tar.gz"))
    assert "checksum mismatch" in msg and "data_batch" not in msg


def test_unknown_contents_named_with_what_is_accepted(tmp_path, capsys):
    import zipfile

    formats._tar_gz(tmp_path / "photos.tar.gz", {"holiday/beach.jpg": b"x", "holiday/sea.jpg": b"y",
                                                 "notes.txt": b"z", "more.txt": b"w"})
    msg = _one_line_error(capsys, _train(tmp_path, tmp_path / "photos.tar.gz"))
    assert "a tar archive of 4 files (holiday/beach.jpg, holiday/sea.jpg, notes.txt, ...), none of them" in msg
    assert "CIFAR-100 (train, test, meta)" in msg and "SVHN" in msg and "STL-10" in msg
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as z:
        z.writestr("data_batch_1", b"x")
    assert "a zip file" in _one_line_error(capsys, _train(tmp_path, tmp_path / "c.zip"))
    formats.write_mnist(tmp_path / "m")
    one = tmp_path / "m" / "train-images-idx3-ubyte.gz"
    assert "gzip file holding no tar archive" in _one_line_error(capsys, _train(tmp_path, one))
    (tmp_path / "labels.csv").write_text("id,label\n1,cat\n")
    assert "a text file (a labels file?" in _one_line_error(capsys, _train(tmp_path, tmp_path / "labels.csv"))
    (tmp_path / "empty.bin").write_bytes(b"")
    assert "an empty file" in _one_line_error(capsys, _train(tmp_path, tmp_path / "empty.bin"))


def test_part_of_a_format_or_several_sets_refused(tmp_path, capsys):
    formats.write_mnist(tmp_path / "m")
    for f in (tmp_path / "m").glob("t10k-*"):
        f.unlink()
    msg = _one_line_error(capsys, _train(tmp_path, tmp_path / "m"))
    assert "lacks t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte" in msg and "MNIST-format IDX" in msg
    formats._tar_gz(tmp_path / "part.tgz", {"cifar-10-batches-py/data_batch_1": b"x"})
    msg = _one_line_error(capsys, _train(tmp_path, tmp_path / "part.tgz"))
    assert "holds data_batch_1 of the CIFAR-10 python archive but lacks data_batch_2" in msg

    both = tmp_path / "both"
    formats.write_svhn(both / "svhn")
    formats.write_mnist(both / "idx")
    msg = _one_line_error(capsys, _train(tmp_path, both))
    assert "holds several data sets" in msg and "SVHN" in msg and "IDX" in msg
    assert load_data(DataConfig(path=str(both / "svhn"))).num_classes == 10  # one of them, given, reads


# --------------------------------------------------------------------------- end to end
def _run(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.parametrize("layout", ["flat", "train-valid", "csv-split"])
def test_digits_trains_evaluates_predicts_reports(tmp_path, capsys, layout):
    """The shipped CNN recipe, unedited, on 8x8 digits: a folder with no split given, a train/valid folder and a
    labels file with a split column."""
    root = formats.write_digits_layout(tmp_path / "digits", layout)
    labels = ["--labels", str(root / "labels.csv")] if layout.startswith("csv") else []
    out = tmp_path / "runs"
    assert _run(["train", "-c", str(REPO / "configs" / "cnn.yaml"), "--data", str(root), *labels, "--epochs", "1",
                 "--out", str(out), "--name", "d", "--set", "train.device=cpu"]) == 0
    run = out / "d"
    cfg = load_config(run / "config.yaml")
    assert cfg.data.image_size == 8  # resolved from the data and saved with the run
    assert _run(["evaluate", str(run)]) == 0
    assert "balanced accuracy" in capsys.readouterr().out
    one = next(p for p in root.rglob("*.png"))
    assert _run(["predict", str(run), str(one)]) == 0
    assert _run(["report", str(run)]) == 0
    assert (run / "report" / "report.html").is_file()


@pytest.mark.parametrize("recipe", ["cnn", "resnet18", "vit", "speedrun"])
def test_shipped_recipes_train_on_mnist_by_name(mirror, monkeypatch, tmp_path, recipe):
    formats.write_mnist(mirror, n_train=60, n_test=20)
    _publish(monkeypatch, "mnist", mirror)
    assert _run(["train", "-c", str(REPO / "configs" / f"{recipe}.yaml"), "--data", "mnist", "--epochs", "1",
                 "--out", str(tmp_path / "runs"), "--name", recipe, "--set", "train.device=cpu",
                 "--set", "train.batch_size=16", "--set", "train.eval_batch_size=64"]) == 0
    assert load_config(tmp_path / "runs" / recipe / "config.yaml").data.image_size == 28


# --------------------------------------------------------------------------- bad input
def _one_line_error(capsys, args) -> str:
    assert _run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _train(tmp_path, data: Path | str, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "runs"), "--name", "x",
            "--set", "train.device=cpu", *extra]


def _png(path: Path, size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(formats.images(1, size)[0]).save(path)


def test_single_class_refused(tmp_path, capsys):
    for i in range(4):
        _png(tmp_path / "d" / "only" / f"{i}.png")
    assert "at least 2 classes" in _one_line_error(capsys, _train(tmp_path, tmp_path / "d"))


def test_empty_class_folder_refused(tmp_path, capsys):
    for i in range(4):
        _png(tmp_path / "d" / "a" / f"{i}.png")
    (tmp_path / "d" / "b").mkdir()
    assert "class folder has no images" in _one_line_error(capsys, _train(tmp_path, tmp_path / "d"))


def test_class_in_test_but_not_train_refused(tmp_path, capsys):
    for cls in ("a", "b"):
        for i in range(4):
            _png(tmp_path / "d" / "train" / cls / f"{i}.png")
    _png(tmp_path / "d" / "test" / "c" / "0.png")
    assert "classes not in train: c" in _one_line_error(capsys, _train(tmp_path, tmp_path / "d"))


def test_labels_file_errors(tmp_path, capsys):
    root = tmp_path / "img"
    for i in range(6):
        _png(root / f"{i}.png")
    (root / "missing.csv").write_text("id,label\n0,a\n1,b\n7,a\n")
    assert "not found" in _one_line_error(capsys, _train(tmp_path, root, "--labels", str(root / "missing.csv")))
    (root / "unknown.csv").write_text("id,label,split\n0,a,train\n1,b,train\n2,a,train\n3,b,train\n4,z,test\n")
    assert "not in training rows: z" in _one_line_error(capsys, _train(tmp_path, root, "--labels",
                                                                       str(root / "unknown.csv")))


def test_mixed_sizes_with_a_fixed_size_model_refused(tmp_path, capsys):
    for cls in ("a", "b"):
        for i in range(6):
            _png(tmp_path / "d" / cls / f"{i}.png", size=16 if i % 2 else 24)
    msg = _one_line_error(capsys, _train(tmp_path, tmp_path / "d", "--set", "model.name=cnn"))
    assert "mixed sizes" in msg and "data.image_size" in msg
    assert not (tmp_path / "runs" / "x").exists()
    # a size given, or a model for any size, trains
    assert _run(_train(tmp_path, tmp_path / "d", "--set", "data.image_size=16", "--set", "model.widths=[4,4,4]",
                       "--set", "model.hidden=8")) == 0


def test_unknown_name_refused(tmp_path, capsys):
    msg = _one_line_error(capsys, _train(tmp_path, "cifar1000"))
    assert "not found" in msg and "cifar100" in msg and "mnist" in msg


# --------------------------------------------------------------------------- imbalance, many classes
def test_summary_scores_by_hand():
    from cifarlab.evaluation.metrics import summary_scores

    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(90, dtype=torch.long), torch.randint(1, 12, (30,), generator=g)])  # imbalanced
    logits = torch.randn(120, 12, generator=g)
    logits[torch.arange(60), y[:60]] += 3.0  # half of them right
    s = summary_scores(logits, y, 12)
    pred = logits.argmax(1)
    recalls = [((pred == c) & (y == c)).sum().item() / (y == c).sum().item() for c in range(12) if (y == c).any()]
    assert s["balanced_acc"] == pytest.approx(np.mean(recalls))
    f1s = []
    for c in range(12):
        tp = ((pred == c) & (y == c)).sum().item()
        fp, fn = ((pred == c) & (y != c)).sum().item(), ((pred != c) & (y == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert s["macro_f1"] == pytest.approx(np.mean(f1s))
    top5 = logits.topk(5, dim=1).indices
    assert s["top5_acc"] == pytest.approx((top5 == y[:, None]).any(1).float().mean().item())
    assert "top5_acc" not in summary_scores(logits[:, :10], y.clamp(max=9), 10)  # top-5 only past 10 classes


def test_balanced_class_weights_and_weighted_loss():
    from sklearn.utils.class_weight import compute_class_weight

    from cifarlab.train.loop import balanced_class_weights, soft_cross_entropy

    y = torch.tensor([0] * 8 + [1] * 2 + [2] * 6)
    w = balanced_class_weights(y, 3)
    assert np.allclose(w.numpy(), compute_class_weight("balanced", classes=np.arange(3), y=y.numpy()))
    logits = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    hard = soft_cross_entropy(logits, y, 0.0, w)
    soft = soft_cross_entropy(logits, torch.nn.functional.one_hot(y, 3).float(), 0.0, w)
    assert torch.allclose(hard, soft) and not torch.allclose(hard, soft_cross_entropy(logits, y, 0.0))


def test_hundred_classes_report_stays_readable(mirror, monkeypatch, tmp_path, capsys):
    """CIFAR-100 (a generated archive in the official format) trains with balanced class weights; evaluate
    adds top-5; the report has the most confused pairs as a table, a sortable per-class table and figures
    of a sane size."""
    from PIL import Image

    formats.write_cifar100(mirror)
    _publish(monkeypatch, "cifar100", mirror)
    out = tmp_path / "runs"
    assert _run(["train", "-c", str(REPO / "configs" / "cnn.yaml"), "--data", "cifar100", "--epochs", "1",
                 "--out", str(out), "--name", "c100", "--set", "train.device=cpu",
                 "--set", "train.class_weights=balanced", "--set", "model.widths=[8,16,32]", "--set", "model.hidden=32"]) == 0
    assert _run(["evaluate", str(out / "c100")]) == 0
    text = capsys.readouterr().out
    assert "top-5 accuracy" in text and "macro F1" in text
    assert _run(["report", str(out / "c100")]) == 0
    page = (out / "c100" / "report" / "report.html").read_text()
    assert "Most confused pairs" in page and 'class="sortable"' in page and "top-5 accuracy" in page
    w, h = Image.open(out / "c100" / "report" / "confusion_matrix.png").size
    assert w < 5000 and h < 2500


def test_data_command_shows_counts_per_split_and_imbalance(tmp_path, capsys):
    for cls, n in (("common", 40), ("rare", 8)):
        for i in range(n):
            _png(tmp_path / "d" / cls / f"{i}.png")
    assert _run(["data", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr()
    assert "carved from the training images" in out.out and "test" in out.out
    rows = {line.split()[0]: line.split()[1:] for line in out.out.splitlines() if line.startswith(("common", "rare"))}
    common, rare = ([int(v) for v in rows[c]] for c in ("common", "rare"))  # train, validation, test
    assert sum(common) == 40 and sum(rare) == 8 and (common[2], rare[2]) == (8, 2)  # 0.2 of each class tested
    assert common[1] + rare[1] == 8 and rare[1] >= 1  # 0.2 of the rest validates, every class in it
    assert "imbalanced" in out.err and "class_weights=balanced" in out.err
