"""``make_report(RUN_DIR)``: every figure of one run as PNGs, every number in JSON, one HTML page.

All metrics come from the saved ``test_logits.npz`` (design rule 7: logits are
computed once, every metric and plot derives from them); the model is run only
when that file is missing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..data import load_data, resolve_source
from ..errors import CifarlabError
from ..evaluation.metrics import classification_metrics, confidently_wrong
from ..io import atomic_write_text
from . import figures
from . import html as H
from .runs import RunFiles, json_safe, load_run, warn

WRONG_GRID = 24  # images in the "most confidently wrong" grid (3 rows of 8)


def load_test_images(run: RunFiles, data_path: str | None = None) -> tuple[np.ndarray | None, str | None]:
    """The run's test images (N, 3, H, W) uint8 in the order of its saved logits, or (None, reason).

    Never downloads: a run whose data cannot be found locally gets no image grid, not an error.
    """

    cfg = copy.deepcopy(run.config.data)
    if data_path:
        cfg.path = data_path
    try:
        kind, _ = resolve_source(cfg.path)
        if kind == "download":
            return None, ("the run's data is not available locally (it was downloaded into another cache); "
                          "pass --data PATH")
        data = load_data(cfg)
    except (CifarlabError, OSError) as e:
        return None, f"cannot load the run's test images ({e}); pass --data PATH"
    if list(data.classes) != run.classes or not np.array_equal(data.test_y.numpy(), run.labels):
        return None, f"the test images at {cfg.path} do not match the run's saved test labels; pass --data PATH"
    return data.test_x.numpy(), None


def wrong_heatmaps(run: RunFiles, images: np.ndarray, predicted: list[int]) -> tuple[np.ndarray | None, str | None]:
    """Overlays (N, 3, H, W) uint8 of each image's Grad-CAM for its predicted class by the run's best weights
    (:mod:`cifarlab.evaluation.explain`, on the CPU), or (None, reason): a report is written without them."""
    import torch

    from ..evaluation.explain import heatmaps, overlay
    from ..evaluation.loader import load_model

    try:
        loaded = load_model(run.run_dir, "cpu")
        maps, _ = heatmaps(loaded.model, torch.from_numpy(np.ascontiguousarray(images)), loaded.normalize, predicted)
    except CifarlabError as e:
        return None, str(e)
    rgb = images.transpose(0, 2, 3, 1)
    return np.stack([overlay(im, m) for im, m in zip(rgb, maps)]).transpose(0, 3, 1, 2), None


def run_summary_rows(run: RunFiles, m: dict[str, Any]) -> list[tuple[str, Any]]:
    s = run.summary
    return [
        ("model", run.config.model.name), ("parameters", s.get("params", run.weights_meta.get("params"))),
        ("epochs", s.get("epochs")), ("best epoch (validation)", s.get("best_epoch")),
        ("best validation accuracy (no TTA)", s.get("best_val_acc")), ("training time (s)", s.get("train_seconds")),
        ("training images per second", s.get("images_per_second")),
        ("device / precision", f"{s.get('device', '?')} / {s.get('precision', '?')}"),
        ("train / validation images", f"{s.get('train_images', '?')} / {s.get('val_images', '?')}"),
        ("data", s.get("data_source", run.config.data.path)), ("test-time augmentation (test numbers)", run.test_metrics.get("tta")),
        ("test images", m["num_test"]), ("test loss", m["test_loss"]), ("top-1 accuracy", m["top1_accuracy"]),
        ("top-2 accuracy", m["top2_accuracy"]),
        *([("top-5 accuracy", m["top5_accuracy"])] if "top5_accuracy" in m else []),
        ("balanced accuracy (mean per-class recall)", m["balanced_accuracy"]), ("macro F1", m["macro_f1"]),
        ("macro AUC (one-vs-rest)", m["macro_auc"]), ("micro AUC", m["micro_auc"]),
        (f"expected calibration error ({m['ece_bins']} bins)", m["ece"]),
    ]


def make_report(run_dir: str | Path, *, data_path: str | None = None) -> Path:
    """Write ``RUN_DIR/report/`` (PNGs, ``metrics.json``, ``report.html``) and return the HTML's path."""
    run = load_run(run_dir)
    out = run.run_dir / "report"
    out.mkdir(exist_ok=True)
    for tmp in out.glob(".*.tmp"):  # what a kill in the middle of an earlier report's write left (never read)
        tmp.unlink(missing_ok=True)
    m, ex = classification_metrics(run.logits, run.labels, run.classes)
    title = f"{run.name} ({run.config.model.name})"
    warnings: list[str] = []
    figs: list[tuple[str, Path, str]] = []  # (heading, png, caption)

    if run.history.get("epoch"):
        figs.append(("Training curves", figures.training_curves(run.history, f"{title}: training curves",
                                                                out / "training_curves.png"),
                     "Loss and accuracy on the training split (averaged over each epoch, with augmentation) and the "
                     "validation split (epochs with validation only), and the learning rate, from metrics.csv."))
    else:
        warnings.append("no metrics.csv: no training curves")
    figs.append(("Confusion matrix", figures.confusion_matrices(ex["cm"], ex["cm_norm"], run.classes, title,
                                                                out / "confusion_matrix.png"),
                 "Rows are true classes, columns predicted classes. Left: image counts; right: each row divided by "
                 "its class's test images, so the diagonal is the per-class accuracy."))
    figs.append(("ROC curves", figures.roc_figure(ex["roc"], run.classes, title, out / "roc.png"),
                 "One-vs-rest ROC curve of each class from the softmax probabilities, with the micro average "
                 "(all class/image pairs pooled) and the macro average (per-class curves averaged)."))
    figs.append(("Per-class scores", figures.per_class_bars(m["per_class"], title, out / "per_class.png"),
                 "Precision, recall and F1 of each class; recall is the per-class accuracy."))
    figs.append(("Calibration", figures.reliability_diagram(m["calibration"], m["ece"], title, out / "reliability.png"),
                 "Test images binned by confidence (top-1 probability): accuracy per bin against the diagonal of "
                 "perfect calibration (Guo et al., 2017). ECE is the image-weighted mean gap."))

    images, why = load_test_images(run, data_path)
    wrong_idx = confidently_wrong(ex["probs"], ex["labels"], WRONG_GRID)
    wrong = [{"index": int(i), "true": run.classes[ex["labels"][i]], "predicted": run.classes[ex["preds"][i]],
              "confidence": float(ex["probs"][i, ex["preds"][i]])} for i in wrong_idx]
    if images is None:
        warn(f"{run.run_dir}: skipping the most-confidently-wrong grid: {why}")
        warnings.append(f"most-confidently-wrong grid skipped: {why}")
    elif len(wrong_idx):
        caps = [f"true: {w['true']}\npred: {w['predicted']} ({w['confidence']:.0%})" for w in wrong]
        grid, colours, about = images[wrong_idx], ["#a00000"] * len(caps), ""
        heat, why_not = wrong_heatmaps(run, grid, [int(ex["preds"][i]) for i in wrong_idx])
        if heat is None:
            warn(f"{run.run_dir}: no heatmaps in the most-confidently-wrong grid: {why_not}")
            warnings.append(f"no heatmaps in the most-confidently-wrong grid: {why_not}")
        else:  # each image, then its heatmap: four pairs a row
            grid = np.stack([c for pair in zip(grid, heat) for c in pair])
            caps = [c for cap, w in zip(caps, wrong) for c in (cap, f"Grad-CAM:\n{w['predicted']}")]
            colours = [x for c in colours for x in (c, "black")]
            about = (" Beside each image, its Grad-CAM heatmap for the predicted (wrong) class: where the model "
                     "found the evidence for it (warm colours: the most).")
        figs.append(("Most confidently wrong test images", figures.image_grid(
            grid, caps, f"{title}: the {len(wrong_idx)} most confidently wrong test images",
            out / "confidently_wrong.png", ncols=8, caption_colours=colours),
            "Misclassified test images with the highest predicted probability, most confident first; the "
            "caption gives the true class, the predicted class and its probability." + about))

    metrics_json = {
        "run": run.name, "run_dir": str(run.run_dir), "model": run.config.model.name,
        "params": run.summary.get("params", run.weights_meta.get("params")),
        "train_seconds": run.summary.get("train_seconds"), "images_per_second": run.summary.get("images_per_second"),
        "best_epoch": run.summary.get("best_epoch"), "best_val_acc": run.summary.get("best_val_acc"),
        **m, "most_confidently_wrong": wrong, "figures": [p.name for _, p, _ in figs], "warnings": warnings,
    }
    atomic_write_text(out / "metrics.json", json.dumps(json_safe(metrics_json), indent=2))

    pc_rows = [(c, v["support"], v["accuracy"], v["precision"], v["recall"], v["f1"], v["auc"])
               for c, v in m["per_class"].items()]
    sections = [("Summary", H.table(["", "value"], run_summary_rows(run, m))),
                ("Per class (click a header to sort)",
                 H.table(["class", "test images", "accuracy", "precision", "recall", "F1", "AUC"], pc_rows,
                         sortable=True))]
    if warnings:
        sections.insert(0, ("Warnings", "".join(f'<p class="warn">{H.esc(w)}</p>' for w in warnings)))
    sections += [(h, H.figure(p, h, cap)) for h, p, cap in figs]
    if m["most_confused"]:  # after the figures: the confusion matrix says it in colour, this says it in numbers
        sections.append(("Most confused pairs", H.table(
            ["true class", "predicted as", "test images", "fraction of the true class"],
            [(p["true"], p["predicted"], p["images"], p["fraction_of_true"]) for p in m["most_confused"]])))
    sections.append(("Configuration (config.yaml)", f"<pre>{H.esc(run.config_text)}</pre>"))
    page = H.page(f"Run report: {run.name}", f"{run.config.model.name} · {run.run_dir} · every number from "
                  f"test_logits.npz; all numbers also in report/metrics.json", sections)
    atomic_write_text(out / "report.html", page)
    return out / "report.html"

