"""train.early_stop: patience in validations and a minimum gain; the best weights are kept, the reason is in
the summary, a resumed run stops where the uninterrupted one does, and decay schedules are refused."""

from __future__ import annotations

import json

import pytest

from cifarlab.config import load_config
from cifarlab.errors import ConfigError
from cifarlab.train import fit
from cifarlab.train.callbacks import early_stop_reason

from .conftest import REPO, tiny_overrides


def _hist(*accs):
    return [{"epoch": i + 1, "val_acc": a} for i, a in enumerate(accs)]


def test_patience_counts_validations_without_a_gain_of_min_delta():
    assert early_stop_reason(_hist(0.5, 0.6, 0.7), 2, 0.0) == ""
    assert early_stop_reason(_hist(0.5, 0.6, 0.6, 0.59), 2, 0.0).startswith("early stop: 2 validation(s)")
    assert early_stop_reason(_hist(0.5, 0.6, 0.6), 2, 0.0) == ""  # one without a gain: patience 2 not used up
    assert early_stop_reason(_hist(0.5, 0.505, 0.509), 2, 0.01) != ""  # gains below min_delta do not count
    assert early_stop_reason(_hist(0.5, "", 0.4, "", 0.45), 2, 0.0) != ""  # epochs without validation skip
    assert "over 0.6000 (epoch 2)" in early_stop_reason(_hist(0.5, 0.6, 0.55, 0.58), 2, 0.0)


def test_decay_schedules_are_refused_with_the_reason():
    for schedule in ("cosine", "linear", "onecycle"):
        with pytest.raises(ConfigError, match=f"train.early_stop=3 is unsound with optim.schedule={schedule}"):
            load_config(None, ["train.early_stop=3", f"optim.schedule={schedule}", "train.epochs=5"])
    load_config(None, ["train.early_stop=3", "optim.schedule=exponential"])
    load_config(None, ["train.early_stop=3", "optim.schedule=constant"])


def test_a_run_that_stops_learning_stops_early_and_keeps_its_best_weights(small_folder, tmp_path):
    # No run gains 60 points between two validations: patience 2 ends it after epoch 3 of 8.
    over = tiny_overrides(small_folder, **{"train.epochs": 8, "optim.schedule": "exponential",
                                           "train.early_stop": 2, "train.early_stop_min_delta": 0.6,
                                           "train.val_every": 1})
    summary = fit(load_config(REPO / "configs" / "cnn.yaml", over), tmp_path, "r", quiet=True)
    run = tmp_path / "r"
    assert summary["epochs"] == 3 and summary["stopped_early"].startswith("early stop: 2 validation(s)")
    assert json.loads((run / "summary.json").read_text())["stopped_early"] == summary["stopped_early"]
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 3
    assert json.loads((run / "best.json").read_text())["epoch"] == summary["best_epoch"] <= 3
    # --resume of the stopped run does not train on: the reason is in its checkpoint
    again = fit(load_config(run / "config.yaml"), tmp_path, "r", resume=True, quiet=True)
    assert again["epochs"] == 3 and again["stopped_early"] == summary["stopped_early"]
