"""data.exclude and data.relabel (the audit's output acted on), and the image names data/ records."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cifarlab.config import DataConfig
from cifarlab.data import load_data
from cifarlab.errors import ConfigError

from .conftest import make_subset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp("edits"), 20, 10)


def _cfg(folder, **kw) -> DataConfig:
    return DataConfig(path=str(folder), val_size=40, **kw)


def test_paths_name_the_files(folder):
    data = load_data(_cfg(folder))
    assert set(data.paths) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        assert len(data.paths[split]) == len(getattr(data, f"{split}_y"))
        for p, y in zip(data.paths[split][:20], getattr(data, f"{split}_y")[:20].tolist()):
            assert (folder / p).is_file() and p.split("/")[1] == data.classes[y]  # train/<class>/NNNN.jpg
    assert not set(data.paths["train"]) & set(data.paths["val"])


def test_exclude_drops_from_every_split_and_keeps_the_rest_in_place(folder, tmp_path):
    full = load_data(_cfg(folder))
    gone = [full.paths["train"][0], full.paths["val"][3], full.paths["test"][5]]
    csv = tmp_path / "issues.csv"
    csv.write_text("path,split,given,suggested,score\n" + "".join(f"{p},x,a,b,0.1\n" for p in gone))
    data = load_data(_cfg(folder, exclude=str(csv)))
    for split in ("train", "val", "test"):
        kept = [p for p in full.paths[split] if p not in gone]
        assert data.paths[split] == kept  # the other images keep their split
        assert len(getattr(data, f"{split}_y")) == len(kept)
    assert data.info["exclude"] == {"file": str(csv), "images": 3}
    text = tmp_path / "list.txt"  # a plain list, with a comment, an absolute path and a blank line
    text.write_text(f"# dropped\n{gone[0]}\n\n{folder / gone[2]}\n")
    data = load_data(_cfg(folder, exclude=str(text)))
    assert len(data.test_y) == len(full.test_y) - 1 and gone[0] not in data.paths["train"]


def test_relabel(folder, tmp_path):
    full = load_data(_cfg(folder))
    p = full.paths["test"][0]
    old = int(full.test_y[0])
    new = (old + 1) % len(full.classes)
    f = tmp_path / "relabel.csv"
    f.write_text(f"path,label\n{p},{full.classes[new]}\n")
    data = load_data(_cfg(folder, relabel=str(f)))
    assert int(data.test_y[0]) == new and data.paths == full.paths
    assert (data.test_y[1:] == full.test_y[1:]).all() and (data.train_y == full.train_y).all()
    assert data.info["relabel"]["images"] == 1


@pytest.mark.parametrize("key, text, match", [
    ("exclude", "path\ntrain/cat/nope.jpg\n", "names no image"),
    ("relabel", "path,label\n{p},unicorn\n", "unknown class 'unicorn'"),
    ("relabel", "file,class\n{p},cat\n", "header names the columns path, label"),
    ("exclude", None, "file not found"),
])
def test_bad_edit_files_are_one_line_errors(folder, tmp_path, key, text, match):
    p = load_data(_cfg(folder)).paths["train"][0]
    f = tmp_path / "edit.csv"
    if text is not None:
        f.write_text(text.format(p=p))
    with pytest.raises(ConfigError, match=match):
        load_data(_cfg(folder, **{key: str(f)}))


def test_cli_data_names_the_exclude_file(folder, tmp_path, capsys):
    from cifarlab.cli.main import main

    p = load_data(_cfg(folder)).paths["train"][0]
    (tmp_path / "x.txt").write_text(p + "\n")
    with pytest.raises(SystemExit) as done:
        main(["data", "--data", str(folder), "--set", f"data.exclude={tmp_path / 'x.txt'}", "-o", str(tmp_path / "o")])
    assert done.value.code == 0
    assert f"data.exclude: {tmp_path / 'x.txt'} (1 images excluded)" in capsys.readouterr().out
    (tmp_path / "y.txt").write_text("train/none.jpg\n")
    with pytest.raises(SystemExit) as done:
        main(["data", "--data", str(folder), "--set", f"data.exclude={tmp_path / 'y.txt'}", "-o", str(tmp_path / "o")])
    assert done.value.code == 2 and "names no image" in capsys.readouterr().err


def test_archive_images_are_named_split_index():
    from cifarlab.data.dataset import image_name, source_paths
    from cifarlab.data.registry import RawData

    x = np.zeros((4, 8, 8, 3), np.uint8)
    raw = RawData(x, np.array([0, 1, 0, 1]), x[:2], np.array([0, 1]), ["a", "b"], "arch")
    names = source_paths(raw)
    assert image_name(names, "train", 3) == "train/3" and image_name(names, "test", 1) == "test/1"
    raw = dataclasses.replace(raw, info={"files": {"train": ["a", "b"]}})  # a count that does not fit: unused
    assert image_name(source_paths(raw), "train", 1) == "train/1"


def test_evaluate_writes_test_predictions(trained_run):
    import csv

    import torch

    z = np.load(trained_run / "test_logits.npz")
    rows = list(csv.DictReader(open(trained_run / "test_predictions.csv")))
    assert len(rows) == len(z["labels"]) and list(rows[0]) == ["path", "label", "predicted", "confidence", "loss"]
    classes = list(z["classes"])
    logits = torch.from_numpy(z["logits"])
    for r, lg, y in zip(rows[:30], logits[:30], z["labels"][:30]):
        assert r["label"] == classes[y] and r["predicted"] == classes[int(lg.argmax())]
        assert r["path"].startswith("test/") and float(r["confidence"]) == pytest.approx(float(lg.softmax(0).max()), abs=1e-5)
        assert float(r["loss"]) == pytest.approx(float(-lg.log_softmax(0)[y]), abs=1e-4)
