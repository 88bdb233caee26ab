"""``cifarlab data``: class counts, normalization statistics, sample and augmentation grids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.config import load_config
from cifarlab.data import load_data
from cifarlab.report.dataset import augment_draws, first_per_class

from .conftest import REPO
from .test_report import main_exit

SPLIT = ["--set", "data.train_size=400", "--set", "data.val_size=200"]


def test_data_overview_counts_stats_and_grids(small_folder, tmp_path, capsys):
    out = tmp_path / "overview"
    code = main_exit(["data", "--data", str(small_folder), *SPLIT, "--config", str(REPO / "configs" / "cnn.yaml"),
                      "--augment", "--draws", "3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "airplane" in printed and "mean (RGB)" in printed
    info = json.loads((out / "data.json").read_text())
    assert info["counts"] == {"train": [40] * 10, "validation": [20] * 10, "test": [20] * 10}
    # Normalization statistics as training computes them, checked with a plain float64 mean / std.
    cfg = load_config(REPO / "configs" / "cnn.yaml", [f"data.path={small_folder}", "data.train_size=400",
                                                      "data.val_size=200"])
    x = load_data(cfg.data).train_x.numpy().astype(np.float64) / 255.0
    assert info["mean"] == pytest.approx(x.mean(axis=(0, 2, 3)), abs=1e-9)
    assert info["std"] == pytest.approx(x.std(axis=(0, 2, 3)), abs=1e-9)
    assert set(info["figures"]) == {"class_counts.png", "samples.png", "augment.png"}
    assert info["warnings"] == []
    w, h = Image.open(out / "augment.png").size
    assert w > 500 and h > 500
    page = (out / "data.html").read_text()
    assert page.count("data:image/png;base64,") == 3


def test_data_overview_default_split_fits_the_data(small_folder, tmp_path):
    # The default validation split is a fraction (0.2) of the training images, whatever their number.
    assert main_exit(["data", "--data", str(small_folder), "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "data.json").read_text())
    assert info["counts"] == {"train": [48] * 10, "validation": [12] * 10, "test": [20] * 10}
    assert info["carved"] == ["val"] and info["warnings"] == []


def test_data_overview_of_a_split_larger_than_the_data(small_folder, tmp_path, capsys):
    # A validation count larger than the 600 images: still an overview, with a warning.
    assert main_exit(["data", "--data", str(small_folder), "--out", str(tmp_path), "--set", "data.val_size=10000"]) == 0
    info = json.loads((tmp_path / "data.json").read_text())
    assert info["counts"] == {"train": [60] * 10, "test": [20] * 10}
    assert info["warnings"] and "warning" in capsys.readouterr().err
    assert not (tmp_path / "augment.png").exists()


def test_data_missing_path_is_one_line_error(tmp_path, capsys):
    assert main_exit(["data", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]


def test_augment_draws_follow_the_config():
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    off = load_config(None, [])
    assert torch.equal(augment_draws(x, off, mean, std, 2)[0], x)  # nothing configured: the original image
    on = load_config(None, ["data.augment_p=1.0", "data.cutout=8"])
    draws = augment_draws(x, on, mean, std, 3)
    assert draws.shape == (3, 5, 3, 32, 32) and draws.dtype == torch.uint8
    assert not torch.equal(draws[0], x) and not torch.equal(draws[0], draws[1])
    assert torch.equal(draws, augment_draws(x, on, mean, std, 3))  # seeded: the same draws every time


def test_first_per_class_interleaves_classes():
    labels = np.array([0, 0, 0, 1, 1, 2])
    assert first_per_class(labels, 2).tolist() == [0, 3, 5, 1, 4]
