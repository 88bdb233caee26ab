"""``cifarlab compare``: three models side by side, and runs on different data or classes refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.special import softmax as scipy_softmax
from sklearn.metrics import roc_auc_score

from cifarlab.config import load_config
from cifarlab.errors import CifarlabError
from cifarlab.evaluation import evaluate_run
from cifarlab.report import compare_runs
from cifarlab.train import fit

from .conftest import tiny_overrides
from .test_report import assert_page_rendered, copy_run, main_exit

COMPARE_FIGURES = {"compare_curves.png", "compare_roc.png", "compare_scores.png"}
# Tiny versions of the other two models; the CNN is the session's trained_run.
TINY = {
    "vit": {"model.name": "vit", "model.patch_size": 4, "model.embed_dim": 16, "model.num_encoder_layers": 1,
            "model.hidden_layer_depth": 32, "model.head_dim": 8, "model.num_heads": 2,
            "model.mlp_head_hidden_layer_depth": 32},
    "resnet18": {"model.name": "resnet18", "data.train_size": 200, "train.epochs": 1},
}


@pytest.fixture(scope="module")
def three_runs(trained_run, small_folder, tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("compare-runs")
    runs = [trained_run]
    for name, extra in TINY.items():
        cfg = load_config(None, tiny_overrides(small_folder, **{"model.widths": None, "model.hidden": None, **extra}))
        summary = fit(cfg, out, f"tiny-{name}", quiet=True)
        evaluate_run(summary["run_dir"])
        runs.append(Path(summary["run_dir"]))
    return runs


def test_compare_three_models(three_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main_exit(["compare", *map(str, three_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(r.name in printed for r in three_runs)
    assert {p.name for p in out.glob("*.png")} == COMPARE_FIGURES
    for png in out.glob("*.png"):
        assert min(Image.open(png).size) >= 400
    result = json.loads((out / "comparison.json").read_text())
    rows = {r["run"]: r for r in result["runs"]}
    assert list(rows) == [r.name for r in three_runs]
    assert {r["model"] for r in rows.values()} == {"cnn", "vit", "resnet18"}
    for run in three_runs:
        row = rows[run.name]
        saved = np.load(run / "test_logits.npz")
        probs = scipy_softmax(saved["logits"].astype(np.float64), axis=1)
        assert row["macro_auc"] == pytest.approx(roc_auc_score(saved["labels"], probs, multi_class="ovr"), abs=1e-12)
        evaluated = json.loads((run / "test_metrics.json").read_text())
        assert row["test_acc"] == pytest.approx(evaluated["test_acc"], abs=1e-6)
        summary = json.loads((run / "summary.json").read_text())
        assert (row["params"], row["train_seconds"], row["images_per_second"]) == (
            summary["params"], summary["train_seconds"], summary["images_per_second"])
        assert 0 <= row["ece"] <= 1
    page = (out / "comparison.html").read_text()
    for header in ("test loss", "macro AUC", "ECE", "parameters", "training time (s)", "images / s"):
        assert f"<th>{header}</th>" in page
    assert_page_rendered(out / "comparison.html", len(COMPARE_FIGURES), tmp_path)


def _rewrite_logits(run: Path, **changes) -> None:
    with np.load(run / "test_logits.npz") as z:
        d = {k: z[k] for k in z.files}
    d.update(changes)
    np.savez(run / "test_logits.npz", **d)


def test_compare_refuses_different_classes(trained_run, tmp_path, capsys):
    a = copy_run(trained_run, tmp_path / "a")
    b = copy_run(trained_run, tmp_path / "b")
    classes = [str(c) for c in np.load(b / "test_logits.npz")["classes"]]
    _rewrite_logits(b, classes=np.array(classes[:-1] + ["lorry"]))
    with pytest.raises(CifarlabError, match="different classes"):
        compare_runs([a, b], tmp_path / "out")
    assert main_exit(["compare", str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different classes" in err[0] and "lorry" in err[0]
    assert not (tmp_path / "out" / "comparison.html").exists()


def test_compare_refuses_different_test_data(trained_run, tmp_path):
    a = copy_run(trained_run, tmp_path / "a")
    b = copy_run(trained_run, tmp_path / "b")
    with np.load(b / "test_logits.npz") as z:
        logits, labels = z["logits"], z["labels"]
    _rewrite_logits(b, logits=logits[:-10], labels=labels[:-10])
    with pytest.raises(CifarlabError, match="different data"):
        compare_runs([a, b], tmp_path / "out")
    c = copy_run(trained_run, tmp_path / "c")
    _rewrite_logits(c, labels=np.roll(labels, 1))
    with pytest.raises(CifarlabError, match="different data"):
        compare_runs([a, c], tmp_path / "out")


def test_compare_refuses_the_same_run_twice(trained_run, tmp_path):
    with pytest.raises(CifarlabError, match="twice"):
        compare_runs([trained_run, trained_run], tmp_path / "out")
