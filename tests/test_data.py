"""Data: image-folder source, decode cache, split, normalization, batched augmentation."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.config import DataConfig
from cifarlab.data import load_data, resolve_source
from cifarlab.data.augment import BatchAugment, study_affine, warp
from cifarlab.data.dataset import channel_stats, load_raw, split_indices
from cifarlab.data.loader import DeviceBatches
from cifarlab.errors import DataError


def _write_folder(root: Path, n_per_class=6, classes=("b_cat", "a_dog", "c_emu"), size=32, mode="RGB") -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).convert(mode).save(d / f"{i}.png")
    return root


def test_split_is_stratified_and_deterministic():
    y = np.repeat(np.arange(10), 500)
    a_tr, a_val = split_indices(y, 4000, 1000, seed=3)
    b_tr, b_val = split_indices(y, 4000, 1000, seed=3)
    c_tr, c_val = split_indices(y, 4000, 1000, seed=4)
    assert np.array_equal(a_tr, b_tr) and np.array_equal(a_val, b_val)
    assert not np.array_equal(a_val, c_val)
    assert len(set(a_tr) & set(a_val)) == 0
    assert np.bincount(y[a_val]).tolist() == [100] * 10
    assert np.bincount(y[a_tr]).tolist() == [400] * 10
    sub_tr, sub_val = split_indices(y, 200, 1000, seed=3)  # a stratified subset, same validation split
    assert np.array_equal(sub_val, a_val) and np.bincount(y[sub_tr]).tolist() == [20] * 10


def test_split_sizes_checked():
    y = np.repeat(np.arange(10), 10)
    with pytest.raises(DataError, match="too few"):
        split_indices(y, 90, 95, seed=0)
    tr, val = split_indices(y, 90, 20, seed=0)  # train_size is an upper bound
    assert len(tr) == 80 and len(val) == 20


def test_image_folder_sorted_classes_and_conversion(tmp_path):
    root = _write_folder(tmp_path / "d", classes=("b_cat", "a_dog", "c_emu"))
    # grayscale, RGBA and another size are converted to RGB 32x32
    Image.new("L", (50, 40), 128).save(root / "train" / "a_dog" / "gray.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 255)).save(root / "train" / "a_dog" / "rgba.png")
    cfg = DataConfig(path=str(root), train_size=15, val_size=6)
    data = load_data(cfg)
    assert data.classes == ["a_dog", "b_cat", "c_emu"]
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape[1:] == (3, 32, 32)
    assert len(data.train_x) == 14 and len(data.val_x) == 6 and len(data.test_x) == 18  # 20 - 6 held out
    raw = load_raw(cfg)
    assert raw.train_x.shape == (20, 32, 32, 3)


def test_unreadable_image_named(tmp_path):
    root = _write_folder(tmp_path / "d")
    bad = root / "train" / "a_dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_data(DataConfig(path=str(root), train_size=10, val_size=3))
    data = load_data(DataConfig(path=str(root), train_size=10, val_size=3, skip_bad_images=True))
    assert data.skipped == 1


def test_cache_reused_and_rebuilt_on_change(tmp_path, monkeypatch):
    root = _write_folder(tmp_path / "d")
    cfg = DataConfig(path=str(root), train_size=12, val_size=6)
    load_data(cfg)
    import cifarlab.data.folder as folder

    calls = []
    orig = folder.load_folder
    monkeypatch.setattr(folder, "load_folder", lambda *a, **k: calls.append(1) or orig(*a, **k))
    load_data(cfg)
    assert calls == []  # second run: from the cache
    f = root / "train" / "a_dog" / "0.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(f)
    os.utime(f, (time.time() + 5, time.time() + 5))
    load_data(cfg)
    assert calls == [1]  # changed source: rebuilt
    raw = load_raw(cfg)  # and the cached arrays hold the new pixels
    assert calls == [1]
    assert (raw.train_x == np.array([1, 2, 3], np.uint8)).all(axis=(1, 2, 3)).any()


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        resolve_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="neither an image folder"):
        resolve_source(str(tmp_path / "odd"))


def test_archive_source(tmp_path):
    from cifarlab.data.archive import write_fake_archive

    path = write_fake_archive(tmp_path / "fake-cifar.tar.gz")  # the official name would be md5-checked
    assert resolve_source(str(path))[0] == "archive"
    data = load_data(DataConfig(path=str(path), train_size=50, val_size=20))
    assert len(data.train_x) == 50 and len(data.val_x) == 20 and data.num_classes == 10


def test_channel_stats_exact():
    x = torch.randint(0, 256, (7, 3, 5, 5), dtype=torch.uint8)
    mean, std = channel_stats(x)
    ref = x.double().div(255).permute(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(mean, ref.mean(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std(1, unbiased=False).numpy(), rtol=1e-9)


def test_normalization_uses_train_split(tmp_path):
    root = _write_folder(tmp_path / "d")
    data = load_data(DataConfig(path=str(root), train_size=12, val_size=6))
    m, s = channel_stats(data.train_x)
    assert data.mean == m and data.std == s
    b = DeviceBatches(data.train_x, data.train_y, 12, mean=data.mean, std=data.std, device="cpu")
    x = b.normalize(data.train_x)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_augment_p0_identity_and_p1_changes():
    x = torch.rand(16, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    theta0 = study_affine(16, DataConfig(augment_p=0.0), g, torch.device("cpu"))
    assert torch.allclose(warp(x, theta0), x, atol=1e-5)
    theta1 = study_affine(16, DataConfig(augment_p=1.0), g, torch.device("cpu"))
    out = warp(x, theta1)
    assert out.shape == x.shape
    assert ((out - x).abs().flatten(1).max(1).values > 1e-3).all()


def test_augment_probability():
    g = torch.Generator().manual_seed(1)
    theta = study_affine(4000, DataConfig(augment_p=0.3), g, torch.device("cpu"))
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    frac = (~torch.isclose(theta, eye).flatten(1).all(1)).float().mean().item()
    assert abs(frac - 0.3) < 0.03


def test_pure_flip_matches_tensor_flip():
    """With rotation 0 and a full-size crop the warp must equal a horizontal flip or the identity."""
    cfg = DataConfig(augment_p=1.0, rotation=0.0, crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0])
    x = torch.rand(64, 3, 32, 32)
    out = warp(x, study_affine(64, cfg, torch.Generator().manual_seed(2), torch.device("cpu")))
    flipped = torch.isclose(out, x.flip(3), atol=1e-5).flatten(1).all(1)
    same = torch.isclose(out, x, atol=1e-5).flatten(1).all(1)
    assert (flipped | same).all() and flipped.any() and same.any()


def test_batches_cover_epoch_and_replay():
    x = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 2, 2).contiguous()
    y = torch.arange(100)
    b = DeviceBatches(x, y, 32, mean=[0, 0, 0], std=[1, 1, 1], device="cpu", shuffle=True, seed=5,
                      augment=BatchAugment(DataConfig(), 100, 5))
    seen = torch.cat([yb for _, _, yb in b.epoch(0)])
    assert sorted(seen.tolist()) == list(range(100))
    again = torch.cat([yb for _, _, yb in b.epoch(0)])
    other = torch.cat([yb for _, _, yb in b.epoch(1)])
    assert torch.equal(seen, again) and not torch.equal(seen, other)
    tail = torch.cat([yb for _, _, yb in b.epoch(0, start_step=2)])
    assert torch.equal(tail, seen[64:])
