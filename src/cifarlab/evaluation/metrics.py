"""Every metric of cifarlab, derived from logits: streaming accuracy (:class:`Accuracy`), the summary scores
``cifarlab evaluate`` writes (:func:`summary_scores`), and every number of a report (:func:`classification_metrics`),
with scikit-learn.

Probabilities are the softmax of the logits in float64. ROC curves are
one-vs-rest per class, plus the micro average (all class/sample pairs pooled)
and the macro average (per-class TPRs interpolated on a common FPR grid and
averaged), as in scikit-learn's "Multiclass ROC" example. Calibration follows
Guo et al. (2017), "On Calibration of Modern Neural Networks": confidence is the
top-1 probability, bins are equal-width, ECE is the bin-size-weighted mean of
|accuracy - confidence|.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (auc, balanced_accuracy_score, confusion_matrix, f1_score, log_loss,
                             precision_recall_fscore_support, roc_auc_score, roc_curve, top_k_accuracy_score)
from sklearn.preprocessing import label_binarize

from ..errors import CifarlabError

ECE_BINS = 15  # Guo et al. (2017) use 15 equal-width bins


class Accuracy:
    """Streaming classification accuracy.

    ``update`` takes logits ``(N, C)`` (float) or predicted labels ``(N,)`` (integer)
    and integer targets ``(N,)``; malformed input raises ``ValueError`` with the
    reason. Counts are kept on the inputs' device, so updates cost no host sync.
    """

    def __init__(self, num_classes: int):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.correct = torch.zeros(self.num_classes, dtype=torch.int64)
        self.total = torch.zeros(self.num_classes, dtype=torch.int64)

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        if not isinstance(preds, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise ValueError("Accuracy.update expects torch tensors")
        if targets.ndim != 1:
            raise ValueError(f"targets must be 1-D (N,), got shape {tuple(targets.shape)}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
            raise ValueError(f"targets must be integer class labels, got dtype {targets.dtype}")
        if preds.ndim == 2:
            if not preds.dtype.is_floating_point:
                raise ValueError(f"logits (N, C) must be floating point, got dtype {preds.dtype}")
            if preds.shape[1] != self.num_classes:
                raise ValueError(f"logits have {preds.shape[1]} classes, expected {self.num_classes}")
            if not torch.isfinite(preds).all():
                raise ValueError("logits contain NaN or infinite values")
            labels = preds.argmax(1)
        elif preds.ndim == 1:
            if preds.dtype.is_floating_point or preds.dtype == torch.bool or preds.is_complex():
                raise ValueError(f"predicted labels (N,) must be integers, got dtype {preds.dtype}")
            labels = preds
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"predicted labels must be in [0, {self.num_classes})")
        else:
            raise ValueError(f"predictions must be logits (N, C) or labels (N,), got shape {tuple(preds.shape)}")
        if len(labels) != len(targets):
            raise ValueError(f"predictions and targets differ in length: {len(labels)} vs {len(targets)}")
        if len(targets) and (targets.min() < 0 or targets.max() >= self.num_classes):
            raise ValueError(f"targets must be in [0, {self.num_classes}), got range "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        if self.correct.device != targets.device:
            self.correct, self.total = self.correct.to(targets.device), self.total.to(targets.device)
        targets = targets.long()
        self.total += torch.bincount(targets, minlength=self.num_classes)
        self.correct += torch.bincount(targets[labels.long() == targets], minlength=self.num_classes)

    def compute(self) -> dict:
        """``{"accuracy": float, "per_class": [float | nan per class], "count": int}``."""
        correct, total = self.correct.cpu(), self.total.cpu()
        n = int(total.sum())
        overall = float(correct.sum()) / n if n else float("nan")
        per_class = [float(c) / float(t) if t else float("nan") for c, t in zip(correct, total)]
        return {"accuracy": overall, "per_class": per_class, "count": n}


def summary_scores(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict:
    """Scores that stay honest under class imbalance and many classes, from test logits (N, C):
    balanced accuracy (the mean of the per-class recalls), macro F1, and top-5 accuracy where C > 10."""
    y = targets.cpu().numpy()
    scores = logits.float().cpu().numpy()
    pred = scores.argmax(1)
    ks = list(range(num_classes))
    out = {"balanced_acc": float(balanced_accuracy_score(y, pred)),
           "macro_f1": float(f1_score(y, pred, labels=ks, average="macro", zero_division=0))}
    if num_classes > 10:
        out["top5_acc"] = float(top_k_accuracy_score(y, scores, k=5, labels=ks))
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def check_logits(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise CifarlabError(f"test logits must have shape (N, {num_classes}), got {logits.shape}")
    if labels.ndim != 1 or len(labels) != len(logits):
        raise CifarlabError(f"test labels must have shape ({len(logits)},), got {labels.shape}")
    if len(labels) == 0:
        raise CifarlabError("the test logits hold no images")
    if not np.isfinite(logits).all():
        raise CifarlabError("the test logits contain NaN or infinite values")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise CifarlabError(f"test labels must be in [0, {num_classes})")


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS
                               ) -> tuple[float, list[dict[str, Any]]]:
    """(ECE, bins): bin b holds confidences in (b/n, (b+1)/n] (bin 0 also holds 0), as in Guo et al.'s code.

    Each bin is ``{"lower", "upper", "count", "accuracy", "confidence"}``; empty bins have
    ``None`` accuracy and confidence and add nothing to the ECE.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], conf, side="left")  # conf in (lower, upper] -> that bin
    n = len(labels)
    ece = 0.0
    bins = []
    for b in range(n_bins):
        m = idx == b
        count = int(m.sum())
        acc = float(correct[m].mean()) if count else None
        c = float(conf[m].mean()) if count else None
        if count:
            ece += count / n * abs(acc - c)
        bins.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count, "accuracy": acc,
                     "confidence": c})
    return ece, bins


def roc_curves(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, Any]:
    """One-vs-rest ROC per class with its AUC, plus micro and macro averages.

    ``macro_auc`` is the mean of the per-class AUCs, which is what
    ``roc_auc_score(..., multi_class="ovr", average="macro")`` returns. A class without
    positives (or without negatives) in the test labels has no ROC curve: its AUC is
    ``None`` and the averages leave it out.
    """
    onehot = label_binarize(labels, classes=np.arange(num_classes))
    if num_classes == 2:  # label_binarize gives one column for two classes
        onehot = np.hstack([1 - onehot, onehot])
    per_class: list[dict[str, Any] | None] = []
    for k in range(num_classes):
        pos = int(onehot[:, k].sum())
        if pos == 0 or pos == len(labels):
            per_class.append(None)
            continue
        fpr, tpr, _ = roc_curve(onehot[:, k], probs[:, k])
        per_class.append({"fpr": fpr, "tpr": tpr, "auc": float(roc_auc_score(onehot[:, k], probs[:, k]))})
    valid = [c for c in per_class if c is not None]
    if not valid:
        raise CifarlabError("ROC curves need test labels of at least two classes")
    fpr_micro, tpr_micro, _ = roc_curve(onehot.ravel(), probs.ravel())
    micro_auc = float(roc_auc_score(onehot, probs, average="micro"))
    grid = np.unique(np.concatenate([c["fpr"] for c in valid]))
    mean_tpr = np.mean([np.interp(grid, c["fpr"], c["tpr"]) for c in valid], axis=0)
    return {
        "per_class": per_class,
        "micro": {"fpr": fpr_micro, "tpr": tpr_micro, "auc": micro_auc},
        # The averaged curve's own area differs slightly from the mean AUC; both are kept.
        "macro": {"fpr": grid, "tpr": mean_tpr, "auc": float(np.mean([c["auc"] for c in valid])),
                  "curve_auc": float(auc(grid, mean_tpr))},
    }


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str],
                           n_bins: int = ECE_BINS) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, extras): ``metrics`` is JSON-ready; ``extras`` holds arrays for the figures
    (probabilities, predictions, confusion matrices, ROC curves, calibration bins)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).astype(np.int64)
    C = len(classes)
    check_logits(logits, labels, C)
    probs = softmax(logits)
    preds = probs.argmax(axis=1)
    ks = np.arange(C)
    cm = confusion_matrix(labels, preds, labels=ks)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cm_norm = np.where(support[:, None] > 0, cm / np.maximum(support[:, None], 1), np.nan)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, labels=ks, zero_division=0)
    roc = roc_curves(labels, probs, C)
    ece, bins = expected_calibration_error(probs, labels, n_bins)
    per_class = {}
    for k, name in enumerate(classes):
        per_class[name] = {
            # Per-class accuracy is the fraction of the class's test images classified correctly (= recall).
            "accuracy": float(cm[k, k] / support[k]) if support[k] else None,
            "precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
            "auc": roc["per_class"][k]["auc"] if roc["per_class"][k] is not None else None,
            "support": int(support[k]),
        }
    metrics = {
        "num_test": int(len(labels)),
        "classes": list(classes),
        "test_loss": float(log_loss(labels, probs, labels=ks)),
        "top1_accuracy": float((preds == labels).mean()),
        "top2_accuracy": float(top_k_accuracy_score(labels, probs, k=2, labels=ks)) if C > 2 else 1.0,
        "balanced_accuracy": float(np.nanmean(np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan))),
        "macro_auc": roc["macro"]["auc"],
        "macro_roc_curve_auc": roc["macro"]["curve_auc"],
        "micro_auc": roc["micro"]["auc"],
        "macro_f1": float(f1_score(labels, preds, labels=ks, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(labels, preds, labels=ks, average="weighted", zero_division=0)),
        "macro_precision": float(np.mean(precision)),
        "macro_recall": float(np.mean(recall)),
        "most_confused": most_confused(cm, classes),
        "ece": ece,
        "ece_bins": n_bins,
        "calibration": bins,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": [[None if math.isnan(v) else float(v) for v in row] for row in cm_norm],
    }
    if C > 10:
        metrics["top5_accuracy"] = float(top_k_accuracy_score(labels, probs, k=5, labels=ks))
    extras = {"probs": probs, "preds": preds, "labels": labels, "cm": cm, "cm_norm": cm_norm, "roc": roc,
              "calibration": bins}
    return metrics, extras


def most_confused(cm: np.ndarray, classes: list[str], n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` largest off-diagonal cells: (true, predicted, images, fraction of the true class)."""
    off = np.array(cm, dtype=np.int64)
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:n]
    support = np.asarray(cm).sum(axis=1)
    out = []
    for flat in order:
        i, j = divmod(int(flat), off.shape[1])
        if off[i, j] == 0:
            break
        out.append({"true": classes[i], "predicted": classes[j], "images": int(off[i, j]),
                    "fraction_of_true": float(off[i, j] / support[i])})
    return out


def confidently_wrong(probs: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of up to ``n`` misclassified images, highest top-1 probability first."""
    preds = probs.argmax(axis=1)
    wrong = np.flatnonzero(preds != labels)
    conf = probs[wrong, preds[wrong]]
    return wrong[np.argsort(-conf, kind="stable")][:n]
