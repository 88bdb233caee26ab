"""The figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display).

Each function takes plain arrays, draws one figure and writes it as a PNG. Every
axis is labelled, classes are named on the ticks, and sizes are chosen so that
text stays readable when the PNG is shown at its own size in the HTML page.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..io import atomic_write

DPI = 110
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]  # matplotlib's tab10


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _save(fig: Figure, path: Path) -> Path:

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight", facecolor="white"))
    return path


def finish_curve_grid(fig: Figure, axes, max_cols: int) -> None:
    """A 2-row grid of curves per epoch: shared y within a row (losses with losses, accuracies with
    accuracies), integer epochs on the bottom row, one legend below."""
    for row in axes:
        lo = min(a.get_ylim()[0] for a in row)
        hi = max(a.get_ylim()[1] for a in row)
        for a in row:
            a.set_ylim(lo, hi)
    for ax in axes[1]:
        ax.set_xlabel("Epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=max(1, min(len(labels), max_cols)), frameon=False,
               fontsize=10, bbox_to_anchor=(0.5, -0.01))


def _finite(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    m = np.isfinite(y)
    return x[m], y[m]


def _marker(n: int) -> str | None:
    return "o" if n <= 30 else None  # markers show single points of short runs; they clutter long ones


# ----------------------------------------------------------------------------- one run
def training_curves(history: dict[str, list[float]], title: str, path: Path) -> Path:
    """Loss, accuracy (train and validation) and learning rate against epoch."""
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    epochs = history.get("epoch", [])
    mk = _marker(len(epochs))
    for ax, key, label in ((axes[0], "loss", "Cross-entropy loss"), (axes[1], "acc", "Accuracy")):
        for split, col, style in (("train", colour(0), "-"), ("val", colour(1), "--")):
            x, y = _finite(epochs, history.get(f"{split}_{key}", []))
            if len(x):
                ax.plot(x, y, style, color=col, marker=mk, label="train" if split == "train" else "validation")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    x, y = _finite(epochs, history.get("lr", []))
    axes[2].plot(x, y, color=colour(2), marker=mk)
    axes[2].set_xlabel("Epoch")
    axes[2].set_ylabel("Learning rate")
    axes[2].set_title("Learning rate (at the epoch's start)")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes[2].grid(alpha=0.3)
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrices(cm: np.ndarray, cm_norm: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    """Counts and row-normalized (each true class sums to 1) side by side."""
    C = len(classes)
    side = min(max(5.5, 0.55 * C + 2.5), 14.0)  # 100 classes: a readable heat map, not a 60-inch figure
    fig = Figure(figsize=(2 * side + 1, side))
    axes = fig.subplots(1, 2)
    annotate = C <= 20  # beyond that, cells are too small for numbers: the most confused pairs are a table
    for ax, mat, sub, fmt in ((axes[0], cm, "counts", "d"), (axes[1], cm_norm, "row-normalized (recall)", ".2f")):
        shown = np.nan_to_num(np.asarray(mat, dtype=float))
        im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=max(shown.max(), 1e-9) if fmt == "d" else 1.0)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="images" if fmt == "d" else "fraction of true class")
        ax.set_xticks(range(C), classes, rotation=45 if C <= 20 else 90, ha="right" if C <= 20 else "center",
                      fontsize=None if C <= 40 else 4)
        ax.set_yticks(range(C), classes, fontsize=None if C <= 40 else 4)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        ax.set_title(f"Confusion matrix, {sub}")
        if annotate:
            hi = shown.max() or 1.0
            for i in range(C):
                for j in range(C):
                    v = mat[i][j]
                    if isinstance(v, float) and math.isnan(v):
                        continue
                    ax.text(j, i, format(int(v), "d") if fmt == "d" else format(v, fmt), ha="center", va="center",
                            fontsize=8 if C <= 12 else 6, color="white" if shown[i, j] > 0.55 * hi else "black")
    fig.suptitle(f"{title}: confusion matrices on the test set", fontsize=13)
    fig.tight_layout()
    return _save(fig, path)


def roc_figure(roc: dict[str, Any], classes: list[str], title: str, path: Path) -> Path:
    """One-vs-rest ROC curve per class, with the micro and macro averages."""
    fig = Figure(figsize=(8.5, 7.5))
    ax = fig.subplots()
    many = len(classes) > 20  # one legend entry per class would hide the plot: thin grey curves instead
    for k, c in enumerate(roc["per_class"]):
        if c is None:
            continue
        if many:
            ax.plot(c["fpr"], c["tpr"], color="#9ab", lw=0.6, alpha=0.5,
                    label=f"each of {len(classes)} classes" if k == 0 else None)
        else:
            ax.plot(c["fpr"], c["tpr"], color=colour(k), lw=1.3, alpha=0.85, label=f"{classes[k]} (AUC {c['auc']:.3f})")
    ax.plot(roc["micro"]["fpr"], roc["micro"]["tpr"], "k--", lw=2.2, label=f"micro-average (AUC {roc['micro']['auc']:.3f})")
    ax.plot(roc["macro"]["fpr"], roc["macro"]["tpr"], "k:", lw=2.6,
            label=f"macro-average (mean AUC {roc['macro']['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="-.", label="chance (AUC 0.5)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(f"{title}: one-vs-rest ROC curves")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8.5)
    fig.tight_layout()
    return _save(fig, path)


def per_class_bars(per_class: dict[str, dict[str, Any]], title: str, path: Path) -> Path:
    """Precision, recall (= per-class accuracy) and F1 per class, grouped bars."""
    classes = list(per_class)
    C = len(classes)
    fig = Figure(figsize=(min(max(9, 0.9 * C + 2), 30), 4.8))
    ax = fig.subplots()
    x = np.arange(C)
    width = 0.27
    for i, (key, label) in enumerate((("precision", "precision"), ("recall", "recall = per-class accuracy"),
                                      ("f1", "F1"))):
        vals = [per_class[c][key] or 0.0 for c in classes]
        ax.bar(x + (i - 1) * width, vals, width, color=colour(i), label=label)
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("Class")
    ax.set_ylabel("Score")
    ax.set_title(f"{title}: precision, recall and F1 per class")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def reliability_diagram(bins: list[dict[str, Any]], ece: float, title: str, path: Path) -> Path:
    """Accuracy against confidence per bin (gap to the diagonal shaded) above a histogram of confidences."""
    fig = Figure(figsize=(7, 8))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    lo = np.array([b["lower"] for b in bins])
    width = lo[1] - lo[0] if len(lo) > 1 else 1.0
    centres = lo + width / 2
    acc = np.array([b["accuracy"] if b["accuracy"] is not None else np.nan for b in bins])
    conf = np.array([b["confidence"] if b["confidence"] is not None else np.nan for b in bins])
    has = np.isfinite(acc)
    top.bar(centres[has], acc[has], width * 0.95, color=colour(0), alpha=0.85, edgecolor="black", lw=0.5,
            label="accuracy")
    gap_lo, gap_hi = np.minimum(acc, conf), np.maximum(acc, conf)
    # Unfilled hatched boxes: the gap reads the same whether the bar over- or undershoots the confidence.
    top.bar(centres[has], (gap_hi - gap_lo)[has], width * 0.95, bottom=gap_lo[has], fill=False,
            edgecolor=colour(3), hatch="///", lw=1.0, label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1.2, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("Accuracy in bin")
    top.set_title(f"{title}: reliability diagram (ECE {ece:.4f}, {len(bins)} bins)")
    top.grid(alpha=0.3)
    top.legend(loc="upper left")
    counts = np.array([b["count"] for b in bins])
    bottom.bar(centres, counts, width * 0.95, color=colour(7), edgecolor="black", lw=0.5)
    bottom.set_xlabel("Confidence (top-1 softmax probability)")
    bottom.set_ylabel("Test images")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def image_grid(images: np.ndarray, captions: list[str], title: str, path: Path, ncols: int = 8,
               caption_colours: list[str] | None = None, row_labels: list[str] | None = None,
               col_labels: list[str] | None = None) -> Path:
    """uint8 images (N, 3, H, W) in a grid, each with its caption below the title line."""
    n = len(images)
    nrows = max(1, math.ceil(n / ncols))
    lines = max((c.count("\n") + 1 for c in captions), default=1)
    fig = Figure(figsize=(1.45 * ncols + (1.2 if row_labels else 0), (1.45 + 0.2 * lines) * nrows + 0.6))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(nrows, ncols)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(np.transpose(images[i], (1, 2, 0)), interpolation="nearest")
        if captions[i]:
            ax.set_title(captions[i], fontsize=8.5, color=(caption_colours[i] if caption_colours else "black"))
        for s in ax.spines.values():
            s.set_visible(False)
    if row_labels:
        for r, label in enumerate(row_labels[:nrows]):
            axes[r, 0].set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center", labelpad=8)
    if col_labels:
        for c, label in enumerate(col_labels[:ncols]):
            axes[0, c].set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- comparison
def compare_curves(histories: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Train / validation loss and accuracy of all runs on shared axes, one colour per run."""
    fig = Figure(figsize=(13, 9))
    axes = fig.subplots(2, 2, sharex=True)
    panels = (("train_loss", "Training loss", "Cross-entropy loss"), ("val_loss", "Validation loss", "Cross-entropy loss"),
              ("train_acc", "Training accuracy", "Accuracy"), ("val_acc", "Validation accuracy", "Accuracy"))
    for ax, (key, name, ylabel) in zip(axes.flat, panels):
        for i, (run, h) in enumerate(histories.items()):
            x, y = _finite(h.get("epoch", []), h.get(key, []))
            if len(x):
                ax.plot(x, y, color=colour(i), marker=_marker(len(x)), label=run)
        ax.set_title(name)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    finish_curve_grid(fig, axes, max_cols=4)
    fig.suptitle("Training curves of all runs (one colour per run)", fontsize=13)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)


def compare_roc(rocs: dict[str, dict[str, Any]], path: Path) -> Path:
    """Macro-average (solid) and micro-average (dashed) ROC curve of every run on one chart."""
    fig = Figure(figsize=(8.5, 7.5))
    ax = fig.subplots()
    for i, (run, roc) in enumerate(rocs.items()):
        ax.plot(roc["macro"]["fpr"], roc["macro"]["tpr"], color=colour(i), lw=2,
                label=f"{run}: macro-average (mean AUC {roc['macro']['auc']:.3f})")
        ax.plot(roc["micro"]["fpr"], roc["micro"]["tpr"], color=colour(i), lw=1.3, ls="--",
                label=f"{run}: micro-average (AUC {roc['micro']['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="-.", label="chance (AUC 0.5)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title("One-vs-rest ROC curves of all runs")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8.5)
    fig.tight_layout()
    return _save(fig, path)


def compare_bars(rows: list[dict[str, Any]], path: Path) -> Path:
    """Test accuracy, macro AUC and ECE per run as grouped bars."""
    names = [r["run"] for r in rows]
    fig = Figure(figsize=(max(7, 1.6 * len(names) + 3), 4.6))
    ax = fig.subplots()
    x = np.arange(len(names))
    width = 0.27
    for i, (key, label) in enumerate((("test_acc", "test accuracy"), ("macro_auc", "macro AUC"), ("ece", "ECE"))):
        vals = [r[key] for r in rows]
        bars = ax.bar(x + (i - 1) * width, vals, width, color=colour(i), label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_xticks(x, names, rotation=15 if len(names) > 3 else 0)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("Run")
    ax.set_ylabel("Value")
    ax.set_title("Test accuracy, macro AUC and calibration error per run")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- data set
def class_counts(counts: dict[str, list[int]], classes: list[str], title: str, path: Path) -> Path:
    """Images per class in each split, grouped bars with their counts."""
    C = len(classes)
    fig = Figure(figsize=(max(9, 1.0 * C + 2), 4.8))
    ax = fig.subplots()
    x = np.arange(C)
    k = len(counts)
    width = 0.8 / max(k, 1)
    for i, (split, vals) in enumerate(counts.items()):
        bars = ax.bar(x + (i - (k - 1) / 2) * width, vals, width, color=colour(i), label=f"{split} ({sum(vals)})")
        if C <= 12:
            ax.bar_label(bars, fontsize=7, padding=1)
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_xlabel("Class")
    ax.set_ylabel("Images")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="split (total)")
    fig.tight_layout()
    return _save(fig, path)
