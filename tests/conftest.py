"""Shared fixtures: a small CIFAR-10-like image folder generated once per session (no download, no
../shared), a private cache per test session, and a tiny trained run for report/predict/export tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401  (hooks: CI=true skips fail)

REPO = Path(__file__).resolve().parents[1]
# The most images per class any test asks make_subset for; every subset links into one generated set.
GENERATED_PER_CLASS = {"train": 60, "test": 20}
_generated: dict[str, Path] = {}


@pytest.fixture(autouse=True, scope="session")
def _session_data(tmp_path_factory):
    """Where make_subset generates its images, once, on first use (most sessions never need them)."""
    _generated["factory"] = tmp_path_factory
    yield
    _generated.clear()


def generated_cifar10() -> Path:
    """The session's CIFAR-10-like image folder: train/<class>/NNNN.jpg and test/<class>/NNNN.jpg, 32x32 RGB
    JPEG quality 75 (the format of the development copy), learnable classes (tests/formats.py), seeded."""
    if "root" not in _generated:
        from .formats import write_cifar10_jpeg

        root = _generated["factory"].mktemp("cifar10-jpeg")
        _generated["root"] = write_cifar10_jpeg(root, GENERATED_PER_CLASS["train"], GENERATED_PER_CLASS["test"])
    return _generated["root"]


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
    """An image folder with the first n images per class of the generated set (symlinks, nothing copied);
    a test may unlink and replace any of its files without touching the others' images."""
    src = generated_cifar10()
    for split, n in (("train", n_train), ("test", n_test)):
        assert n <= GENERATED_PER_CLASS[split], f"make_subset: at most {GENERATED_PER_CLASS[split]} {split} images"
        for cls_dir in sorted((src / split).iterdir()):
            out = dst / split / cls_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                (out / f.name).symlink_to(f)
    return dst


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory) -> Path:
    """60 train + 20 test images per class of the generated set (600 + 200 images)."""
    return make_subset(tmp_path_factory.mktemp("cifar-small"), 60, 20)


def tiny_overrides(data_path: Path, **extra) -> list[str]:
    """Config overrides for a seconds-long CPU run on the small folder."""
    o = {"data.path": str(data_path), "data.train_size": 400, "data.val_size": 200, "train.epochs": 2,
         "train.batch_size": 64, "train.eval_batch_size": 256, "train.precision": "fp32", "train.device": "cpu",
         "model.widths": "[8, 16, 32]", "model.hidden": 32}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items() if v is not None]


def tiny_set_args(data_path: Path, **extra) -> list[str]:
    """``tiny_overrides`` as command-line arguments: ``--set KEY=VALUE`` for each."""
    return [x for o in tiny_overrides(data_path, **extra) for x in ("--set", o)]


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
