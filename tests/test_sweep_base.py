"""A sweep continued with another base config is refused (or starts a new study on request); the data cache of
a worker is keyed by the whole data section; trackers other than W&B log each trial (issue 20)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml

from cifarlab.config import DataConfig
from cifarlab.errors import ConfigError
from cifarlab.sweep import best_config_yaml, open_study, run_sweep
from cifarlab.sweep.objective import data_key
from cifarlab.sweep.storage import base_difference

from .conftest import tiny_overrides


def _sweep(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"name": "base", "method": "random", "run_cap": 1,
                                    "parameters": {"optim.lr": {"values": [0.003]}}}, sort_keys=False))
    return path


def _tiny(small_folder, **extra):
    return tiny_overrides(small_folder, **{"model.widths": "[8, 16, 16]", "model.hidden": 32, "train.epochs": 1,
                                           **extra})


def test_changed_base_is_refused_naming_the_difference_or_starts_a_new_study(small_folder, tmp_path):
    f = _sweep(tmp_path / "s.yaml")
    kw = dict(out=tmp_path, quiet=True)
    run_sweep(f, overrides=_tiny(small_folder), **kw)
    assert run_sweep(f, overrides=_tiny(small_folder), **kw)["counted"] == 1  # the same base continues
    with pytest.raises(ConfigError, match=r"another base config \(train.epochs: 1 -> 2\)"):
        run_sweep(f, overrides=_tiny(small_folder, **{"train.epochs": 2}), **kw)
    with pytest.raises(ConfigError, match=r"model.hidden: 32 -> 64.*--new-study"):
        run_sweep(f, overrides=_tiny(small_folder, **{"model.hidden": 64}), **kw)
    # The trials that ran are still described by the stored base: best rebuilds exactly their config.
    assert yaml.safe_load(best_config_yaml(open_study(tmp_path / "base")))["train"]["epochs"] == 1
    summary = run_sweep(f, overrides=_tiny(small_folder, **{"train.epochs": 2}), new_study=True, **kw)
    assert summary["study"] == "base-2" and summary["counted"] == 1
    assert yaml.safe_load(best_config_yaml(open_study(tmp_path / "base-2")))["train"]["epochs"] == 2
    # Asked again, --new-study finds the study that already has this base and continues it.
    assert run_sweep(f, overrides=_tiny(small_folder, **{"train.epochs": 2}), new_study=True, **kw)["study"] == "base-2"


def test_where_a_trial_runs_is_not_a_difference():
    a = {"data": {"path": "/a/cifar", "train_size": 10}, "train": {"device": "cpu", "epochs": 2}}
    b = {"data": {"path": "/b/cifar", "train_size": 10}, "train": {"device": "cuda", "epochs": 2}}
    assert base_difference(a, b) == []
    b["data"]["train_size"] = 20
    assert base_difference(a, b) == ["data.train_size: 10 -> 20"]
    # A base stored by an older cifarlab (without a key added since, or with a renamed key) compares equal.
    assert base_difference({"data": {"hflip": False}}, {"data": {"augment_flip": False}}) == []


def test_data_cache_key_covers_the_whole_data_section():
    base = DataConfig()
    assert data_key(base) != data_key(dataclasses.replace(base, train_size=100))
    assert data_key(base) != data_key(dataclasses.replace(base, skip_bad_images=True))
    assert data_key(base) == data_key(dataclasses.replace(base, augment_p=0.5, cutout=4))  # batch-time only
    # A data key added later is part of the key without anyone listing it.
    Extended = dataclasses.make_dataclass("Extended", [("labels", str, "none")], bases=(DataConfig,))
    assert data_key(Extended()) != data_key(Extended(labels="labels.csv"))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_sweep_trials_log_to_other_trackers(small_folder, tmp_path):
    f = _sweep(tmp_path / "s.yaml")
    summary = run_sweep(f, out=tmp_path, quiet=True, trackers=["tensorboard"], overrides=_tiny(small_folder))
    trial = Path(summary["sweep_dir"]) / "trials" / "trial-0000"
    assert any((trial / "tensorboard").rglob("events.out.tfevents.*"))
