"""Shared fixtures: a small image folder made of links into the shared CIFAR-10 copy,
a private cache per test session, and a tiny trained run for report/predict/export tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = Path(os.environ.get("CIFARLAB_TEST_DATA", REPO.parent / "shared" / "datasets" / "cifar10-jpeg"))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Never touch the user's ~/.cache/cifarlab from tests."""
    old = os.environ.get("CIFARLAB_CACHE")
    os.environ["CIFARLAB_CACHE"] = str(tmp_path_factory.mktemp("cifarlab-cache"))
    os.environ.pop("CIFARLAB_DATA", None)
    yield
    if old is None:
        os.environ.pop("CIFARLAB_CACHE", None)
    else:
        os.environ["CIFARLAB_CACHE"] = old


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def make_subset(dst: Path, n_train: int, n_test: int) -> Path:
    """An image folder with the first n images per class of the shared set (symlinks, nothing copied)."""
    if not SHARED_CIFAR.is_dir():
        pytest.skip(f"shared CIFAR-10 copy not found at {SHARED_CIFAR}")
    for split, n in (("train", n_train), ("test", n_test)):
        for cls_dir in sorted((SHARED_CIFAR / split).iterdir()):
            out = dst / split / cls_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                (out / f.name).symlink_to(f)
    return dst


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory) -> Path:
    """60 train + 20 test images per class from the shared set (600 + 200 images)."""
    return make_subset(tmp_path_factory.mktemp("cifar-small"), 60, 20)


def tiny_overrides(data_path: Path, **extra) -> list[str]:
    """Config overrides for a seconds-long CPU run on the small folder."""
    o = {"data.path": str(data_path), "data.train_size": 400, "data.val_size": 200, "train.epochs": 2,
         "train.batch_size": 64, "train.eval_batch_size": 256, "train.precision": "fp32", "train.device": "cpu",
         "model.widths": "[8, 16, 32]", "model.hidden": 32}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items() if v is not None]


@pytest.fixture(scope="session")
def trained_run(small_folder, tmp_path_factory) -> Path:
    """A tiny CNN run, trained and evaluated once per session: RUN_DIR with config, weights, metrics, test logits."""
    from cifarlab.config import load_config
    from cifarlab.evaluation import evaluate_run
    from cifarlab.train import fit

    cfg = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder))
    out = tmp_path_factory.mktemp("runs")
    summary = fit(cfg, out, "tiny-cnn", quiet=True)
    evaluate_run(summary["run_dir"])
    return Path(summary["run_dir"])
