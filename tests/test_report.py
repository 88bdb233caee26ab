"""Run reports: metrics against scikit-learn, ECE by hand, files and figures, and the page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy.special import softmax as scipy_softmax
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from cifarlab.cli.main import main
from cifarlab.errors import CifarlabError
from cifarlab.evaluation.metrics import classification_metrics, expected_calibration_error
from cifarlab.report import make_report
from .conftest import REPO, tiny_overrides

RUN_FIGURES = {"training_curves.png", "confusion_matrix.png", "roc.png", "per_class.png", "reliability.png",
               "confidently_wrong.png"}


# ----------------------------------------------------------------------------- helpers
def copy_run(run: Path, dst: Path) -> Path:
    """A private copy, so that tests may change files without touching the shared fixture."""
    return Path(shutil.copytree(run, dst / run.name, ignore=shutil.ignore_patterns("report", "last.pt")))


def render_html(html: Path, tmp_path: Path) -> tuple[dict[str, str], np.ndarray]:
    """Load ``html`` in headless Chromium: the <body> attributes after load, and a screenshot as an array."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (.ci/deps/chromium.sh installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")

    def run(*extra: str, profile: str) -> subprocess.CompletedProcess:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / profile}"]
        return subprocess.run([exe, *flags, *extra, html.resolve().as_uri()], capture_output=True, text=True,
                              timeout=900)  # a deadlock guard

    # The virtual time budget lets the page's load handler run before the DOM is dumped.
    dom = run("--virtual-time-budget=10000", "--dump-dom", profile="profile-dom")
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, f"no <body> in Chromium's DOM dump; stderr: {dom.stderr[-2000:]}"
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    shot_path = tmp_path / "screenshot.png"
    shot = run("--window-size=1280,2400", "--hide-scrollbars", f"--screenshot={shot_path}", profile="profile-shot")
    assert shot_path.is_file(), f"Chromium wrote no screenshot; stderr: {shot.stderr[-2000:]}"
    return attrs, np.asarray(Image.open(shot_path).convert("RGB"))


def assert_page_rendered(html: Path, n_images: int, tmp_path: Path) -> None:
    attrs, shot = render_html(html, tmp_path)
    assert attrs.get("data-images-total") == str(n_images)
    assert attrs.get("data-images-loaded") == str(n_images), "some figures did not decode in the browser"
    # Not blank: a white page with some dark text is not enough; the figures bring colour and spread.
    non_white = (shot < 245).any(axis=2).mean()
    coloured = (np.ptp(shot.astype(int), axis=2) > 40).mean()
    assert shot.std() > 20 and non_white > 0.05 and coloured > 0.005, (shot.std(), non_white, coloured)


# ----------------------------------------------------------------------------- metrics
def random_logits(n: int = 300, c: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)).astype(np.float32)
    logits[np.arange(n), labels] += rng.uniform(0, 3, n).astype(np.float32)  # better than chance, not perfect
    return logits, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_auc_and_f1_equal_sklearn(seed):
    logits, labels = random_logits(seed=seed)
    classes = [f"c{i}" for i in range(10)]
    m, _ = classification_metrics(logits, labels, classes)
    probs = scipy_softmax(logits.astype(np.float64), axis=1)
    preds = probs.argmax(1)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-12)
    onehot = np.eye(10)[labels]
    assert m["micro_auc"] == pytest.approx(roc_auc_score(onehot, probs, average="micro"), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"), abs=1e-12)
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=range(10), zero_division=0)
    for k, name in enumerate(classes):
        pc = m["per_class"][name]
        assert pc["auc"] == pytest.approx(roc_auc_score(labels == k, probs[:, k]), abs=1e-12)
        assert (pc["f1"], pc["precision"], pc["recall"], pc["support"]) == pytest.approx((f[k], p[k], r[k], s[k]))
        assert pc["accuracy"] == pytest.approx(r[k])
    assert m["confusion_matrix"] == confusion_matrix(labels, preds).tolist()
    assert m["top1_accuracy"] == pytest.approx((preds == labels).mean())
    top2 = np.argsort(-probs, axis=1)[:, :2]
    assert m["top2_accuracy"] == pytest.approx((top2 == labels[:, None]).any(1).mean())
    assert m["test_loss"] == pytest.approx(-np.log(probs[np.arange(len(labels)), labels]).mean(), rel=1e-9)


def test_ece_on_a_hand_computed_example():
    # Confidences 0.85 (right), 0.85 (wrong), 0.55 (right), 0.65 (right), 10 bins:
    # bin (0.8, 0.9]: |0.5 - 0.85| * 2/4 = 0.175; (0.5, 0.6]: |1 - 0.55| / 4 = 0.1125; (0.6, 0.7]: |1 - 0.65| / 4
    # = 0.0875; ECE = 0.375.
    probs = np.array([[0.85, 0.15], [0.85, 0.15], [0.45, 0.55], [0.65, 0.35]])
    labels = np.array([0, 1, 1, 0])
    ece, bins = expected_calibration_error(probs, labels, n_bins=10)
    assert ece == pytest.approx(0.375, abs=1e-12)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 1, 1, 0, 2, 0]
    assert bins[8]["accuracy"] == 0.5 and bins[8]["confidence"] == pytest.approx(0.85)
    # Through the logits path: the same probabilities as log-probabilities give the same ECE.
    m, _ = classification_metrics(np.log(probs), labels, ["a", "b"], n_bins=10)
    assert m["ece"] == pytest.approx(0.375, abs=1e-12)


def test_ece_is_zero_when_confidence_equals_accuracy():
    # Four images at confidence 0.75, three of them right: accuracy 0.75 in the one occupied bin.
    probs = np.array([[0.75, 0.25]] * 4)
    ece, _ = expected_calibration_error(probs, np.array([0, 0, 0, 1]), n_bins=10)
    assert ece == pytest.approx(0.0, abs=1e-12)


def test_bad_logits_are_refused():
    with pytest.raises(CifarlabError, match="shape"):
        classification_metrics(np.zeros((4, 3)), np.zeros(4, int), ["a", "b"])
    with pytest.raises(CifarlabError, match="NaN"):
        classification_metrics(np.full((2, 2), np.nan), np.array([0, 1]), ["a", "b"])


# ----------------------------------------------------------------------------- run report
def test_report_files_numbers_and_page(trained_run, tmp_path, monkeypatch):
    run = copy_run(trained_run, tmp_path)
    import cifarlab.evaluation

    def no_model(*a, **k):
        raise AssertionError("the model must not be re-run when test_logits.npz exists")

    monkeypatch.setattr(cifarlab.evaluation, "evaluate_run", no_model)
    html = make_report(run)
    out = run / "report"
    assert html == out / "report.html"
    assert {p.name for p in out.glob("*.png")} == RUN_FIGURES
    for png in out.glob("*.png"):
        w, h = Image.open(png).size
        assert w >= 600 and h >= 300, (png.name, w, h)

    m = json.loads((out / "metrics.json").read_text())
    saved = np.load(run / "test_logits.npz")
    probs = scipy_softmax(saved["logits"].astype(np.float64), axis=1)
    labels = saved["labels"]
    assert m["macro_auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"), abs=1e-12)
    evaluated = json.loads((run / "test_metrics.json").read_text())
    assert m["top1_accuracy"] == pytest.approx(evaluated["test_acc"], abs=1e-6)  # evaluate averages in float32
    assert m["test_loss"] == pytest.approx(evaluated["test_loss"], rel=1e-5)
    for name, acc in evaluated["per_class_acc"].items():
        assert m["per_class"][name]["accuracy"] == pytest.approx(acc)
    assert set(m["figures"]) == RUN_FIGURES and m["warnings"] == []
    assert len(m["most_confidently_wrong"]) == min(24, int((probs.argmax(1) != labels).sum()))
    confs = [w["confidence"] for w in m["most_confidently_wrong"]]
    assert confs == sorted(confs, reverse=True)

    page = html.read_text()
    assert page.count('<img src="data:image/png;base64,') == len(RUN_FIGURES)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not load anything from a network"
    assert "model:" in page and "airplane" in page  # the config and the class names are on the page
    assert_page_rendered(html, len(RUN_FIGURES), tmp_path)


def test_report_evaluates_once_when_logits_are_missing(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    (run / "test_logits.npz").unlink()
    make_report(run)
    assert (run / "test_logits.npz").is_file()
    assert (run / "report" / "report.html").is_file()


def test_report_without_data_skips_only_the_image_grid(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["path"] = str(tmp_path / "moved-away")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    make_report(run)
    assert "warning" in capsys.readouterr().err
    assert {p.name for p in (run / "report").glob("*.png")} == RUN_FIGURES - {"confidently_wrong.png"}
    m = json.loads((run / "report" / "metrics.json").read_text())
    assert m["warnings"] and "confidently" in m["warnings"][0]
    # --data points the report at the data's new place.
    assert main_exit(["report", str(run), "--data", cfg_path(trained_run)]) == 0
    assert (run / "report" / "confidently_wrong.png").is_file()


def cfg_path(run: Path) -> str:
    return yaml.safe_load((run / "config.yaml").read_text())["data"]["path"]


def main_exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_report_cli_errors_are_one_line(tmp_path, capsys):
    assert main_exit(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run directory" in err[0]


def test_train_with_report_flag(small_folder, tmp_path):
    sets = [a for o in tiny_overrides(small_folder, **{"train.epochs": 1}) for a in ("--set", o)]
    code = main_exit(["train", "--config", str(REPO / "configs" / "cnn.yaml"), *sets, "--out", str(tmp_path),
                      "--name", "r", "--report"])
    assert code == 0
    assert (tmp_path / "r" / "report" / "report.html").is_file()
    assert (tmp_path / "r" / "report" / "metrics.json").is_file()


def test_browser_check_sees_a_broken_image(tmp_path):
    """The Chromium check itself can fail: a figure that does not decode is not counted as loaded."""
    from cifarlab.report import html as H

    png = tmp_path / "ok.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(png)
    page = H.page("t", "m", [("good", H.figure(png, "good", "")),
                             ("broken", '<img src="data:image/png;base64,AAAA" alt="broken">')])
    (tmp_path / "p.html").write_text(page)
    attrs, _ = render_html(tmp_path / "p.html", tmp_path)
    assert (attrs["data-images-loaded"], attrs["data-images-total"]) == ("1", "2")
