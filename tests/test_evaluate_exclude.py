"""``evaluate`` on a run trained with ``data.exclude``: the cleaned test accuracy, and the full one beside it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml


def test_evaluate_reports_the_full_test_accuracy_beside_the_cleaned(trained_run, tmp_path, capsys):
    from cifarlab.cli.main import main
    from cifarlab.evaluation import evaluate_run

    full = json.loads((trained_run / "test_metrics.json").read_text())
    z = np.load(trained_run / "test_logits.npz")
    paths = [r.split(",")[0] for r in (trained_run / "test_predictions.csv").read_text().splitlines()[1:]]
    correct = z["logits"].argmax(1) == z["labels"]
    # drop 30 test images, most of them ones the model gets right, so the two accuracies must differ
    gone = [i for i in np.flatnonzero(correct)[:25]] + [i for i in np.flatnonzero(~correct)[:5]]
    ex = tmp_path / "exclude.csv"
    ex.write_text("path\n" + "".join(f"{paths[i]}\n" for i in gone))
    run = tmp_path / "cleaned"  # the run as if trained with the exclude file: its config names it
    shutil.copytree(trained_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["exclude"] = str(ex)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))

    res = evaluate_run(run)
    keep = np.setdiff1d(np.arange(len(paths)), gone)
    assert res["num_test"] == len(keep) and res["num_test_full"] == len(paths) and res["test_excluded"] == 30
    assert res["test_acc"] == pytest.approx(correct[keep].mean(), abs=1e-6)
    assert res["test_acc_full"] == pytest.approx(full["test_acc"], abs=1e-6)
    assert res["test_acc_full"] != pytest.approx(res["test_acc"], abs=1e-3)
    assert res["test_acc_excluded"] == pytest.approx(correct[gone].mean(), abs=1e-6)
    assert json.loads((run / "test_metrics.json").read_text())["test_acc_full"] == res["test_acc_full"]
    assert len(np.load(run / "test_logits.npz")["labels"]) == len(keep)  # the logits are the cleaned split's

    with pytest.raises(SystemExit) as done:
        main(["evaluate", str(run)])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"on the full test split: {len(paths)} images, the 30 that data.exclude drops put back" in out
    assert f"{res['test_acc_full']:.4f}" in out


def test_evaluate_without_exclude_has_no_full_line(trained_run):
    res = json.loads((trained_run / "test_metrics.json").read_text())
    assert "test_acc_full" not in res
