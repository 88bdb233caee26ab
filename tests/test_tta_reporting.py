"""Numbers that say how they were made (issue 20): the TTA beside every accuracy, plain and TTA test accuracy,
predictions that default to evaluate's TTA (and so reproduce its accuracy), exports that say TTA is outside."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import cifarlab
from cifarlab.cli.main import main
from cifarlab.data.folder import list_folder
from cifarlab.evaluation import evaluate_run, format_table
from cifarlab.predict import Predictor, run_tta

from .conftest import REPO, tiny_set_args


@pytest.fixture(scope="module")
def flip_run(trained_run, tmp_path_factory) -> Path:
    """The session's tiny run (evaluated without TTA), copied and set to train.tta=flip, then evaluated."""
    run = tmp_path_factory.mktemp("tta") / "flip-run"
    shutil.copytree(trained_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["tta"] = "flip"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    evaluate_run(run)
    return run


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_evaluate_reports_plain_and_tta_accuracy(trained_run, flip_run):
    plain = json.loads((trained_run / "test_metrics.json").read_text())
    res = json.loads((flip_run / "test_metrics.json").read_text())
    assert plain["tta"] == "none" and plain["test_acc_no_tta"] == plain["test_acc"]
    assert res["tta"] == "flip" and res["tta_views"] == 2 and res["val_tta"] == "none"
    # The same weights: the one-view number of the TTA run is the plain run's accuracy, to the image.
    assert res["test_acc_no_tta"] == pytest.approx(plain["test_acc"], abs=1e-6)
    logits = np.load(flip_run / "test_logits.npz")
    assert res["test_acc"] == pytest.approx((logits["logits"].argmax(1) == logits["labels"]).mean(), abs=1e-6)
    table = format_table(res)
    assert "(tta flip, 2 views)" in table and "(no tta: one view" in table and "val accuracy" in table
    # A run without a validation split keeps its final weights: no "val accuracy nan" line.
    table = format_table({**res, "val_acc": float("nan")})
    assert "val accuracy" not in table and "nan" not in table


def test_a_run_without_validation_says_its_final_weights_are_kept(small_folder, tmp_path, capsys):
    sets = tiny_set_args(small_folder, **{"data.val_size": 0, "train.epochs": 1})
    code, out, err = _cli(capsys, "train", "--config", str(REPO / "configs/cnn.yaml"), "--out", str(tmp_path),
                        "--name", "r", *sets)
    assert code == 0
    done = [line for line in (out + err).splitlines() if line.startswith("done: ")]
    assert done and done[-1].startswith("done: no validation split: the final weights kept (epoch 1;"), done
    # best.json says so in valid JSON (null, not NaN), and evaluate prints no validation line.
    meta = json.loads((tmp_path / "r" / "best.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert meta["val_acc"] is None and meta["epoch"] == 1


def test_training_records_that_selection_uses_no_tta(trained_run):
    meta = json.loads((trained_run / "best.json").read_text())
    summary = json.loads((trained_run / "summary.json").read_text())
    assert meta["val_tta"] == "none" and meta["tta"] == "none"
    assert summary["val_tta"] == "none" and summary["test_tta"] == "none"


def test_predict_defaults_to_evaluates_tta_and_reproduces_its_accuracy(flip_run, small_folder):
    _, files = list_folder(small_folder)
    paths, labels = [p for p, _ in files["test"]], [y for _, y in files["test"]]
    saved = np.load(flip_run / "test_logits.npz")
    assert labels == saved["labels"].tolist()
    model = cifarlab.load(flip_run)
    assert model.tta == "flip" == run_tta(flip_run)
    preds = model.predict(paths, top_k=1)
    assert [p.indices[0] for p in preds] == saved["logits"].argmax(1).tolist()
    acc = np.mean([p.indices[0] == y for p, y in zip(preds, labels)])
    assert acc == pytest.approx(json.loads((flip_run / "test_metrics.json").read_text())["test_acc"], abs=1e-6)
    # tta="none": one view, the plain accuracy.
    one = cifarlab.load(flip_run, tta="none")
    acc1 = np.mean([p.indices[0] == y for p, y in zip(one.predict(paths, top_k=1), labels)])
    assert acc1 == pytest.approx(json.loads((flip_run / "test_metrics.json").read_text())["test_acc_no_tta"],
                                 abs=1e-6)
    with pytest.raises(Exception, match="tta must be one of"):
        Predictor.from_run(flip_run, tta="rotate")


def test_predict_cli_says_which_tta(flip_run, small_folder, capsys):
    img = str(next((small_folder / "test").rglob("*.jpg")))
    rc, out, err = _cli(capsys, "predict", str(flip_run), img, "--device", "cpu")
    assert rc == 0 and "predict: tta flip, 2 views (as cifarlab evaluate" in err and img in out
    rc, _, err = _cli(capsys, "predict", str(flip_run), img, "--tta", "none", "--device", "cpu")
    assert rc == 0 and "predict: no tta" in err


def test_export_says_tta_is_not_in_the_graph(flip_run, tmp_path, capsys):
    rc, out, _ = _cli(capsys, "export", str(flip_run), "--format", "safetensors", "-o", str(tmp_path / "exp"))
    assert rc == 0 and "not part of the exported model" in out and "tta flip" in out
    meta = json.loads((tmp_path / "exp" / "model.json").read_text())
    assert meta["tta_in_graph"] is False and meta["run_tta"] == "flip"
    # An exported file keeps the run's TTA as its default.
    assert Predictor.from_run(tmp_path / "exp" / "model.safetensors").tta == "flip"
    # The old file form of --out still works, with a note.
    rc, _, err = _cli(capsys, "export", str(flip_run), "--format", "safetensors", "-o", str(tmp_path / "w.safetensors"))
    assert rc == 0 and (tmp_path / "w.safetensors").is_file() and "deprecated" in err


def test_compare_shows_each_runs_tta(trained_run, flip_run, tmp_path, capsys):
    rc, out, _ = _cli(capsys, "compare", str(trained_run), str(flip_run), "-o", str(tmp_path / "cmp"))
    assert rc == 0 and "TTA" in out.splitlines()[0] and "top-2" in out and "macro F1" in out
    rows = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["runs"]
    assert [r["tta"] for r in rows] == ["none", "flip"]
