"""The numbers of a comparison of models: one row per run or seeds group, per-class scores, mean
curves, and the significance of every pairwise difference. :mod:`cifarlab.report.compare` and the
study report render them; nothing here draws or writes HTML.

Every number comes from each run's saved test logits, so all runs are scored by the same code on
the same test images, and the paired tests (:mod:`.significance`) compare predictions image by image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .groups import aggregate_rows, mean_history
from .metrics import classification_metrics
from .significance import pairwise

# The row keys aggregated over seeds (mean, std, 95% t-interval) for a group.
SPREAD_KEYS = ("test_loss", "test_acc", "top2_acc", "macro_auc", "macro_f1", "ece", "train_seconds",
               "images_per_second", "best_val_acc")


@dataclass
class Entry:
    """A single run (one element in ``runs``) or a seeds group, as named in the comparison."""

    name: str
    path: Path
    runs: list  # RunFiles (cifarlab.report.runs), seed order for a group
    seeds: list[int]
    group: bool = False
    metrics: list[tuple[dict, dict]] = field(default_factory=list)  # classification_metrics per run


def run_row(name: str, r, m: dict[str, Any]) -> dict[str, Any]:
    s = r.summary
    return {"run": name, "model": r.config.model.name, "run_dir": str(r.run_dir),
            "test_loss": m["test_loss"], "test_acc": m["top1_accuracy"], "top2_acc": m["top2_accuracy"],
            "macro_auc": m["macro_auc"], "macro_f1": m["macro_f1"], "ece": m["ece"],
            "params": s.get("params", r.weights_meta.get("params")), "train_seconds": s.get("train_seconds"),
            "images_per_second": s.get("images_per_second"), "epochs": s.get("epochs"),
            "tta": r.test_metrics.get("tta"), "balanced_acc": m["balanced_accuracy"],
            "best_val_acc": s.get("best_val_acc"), "train_images": s.get("train_images"),
            "device": s.get("device")}


def _score(e: Entry) -> None:
    if not e.metrics:
        e.metrics = [classification_metrics(r.logits, r.labels, r.classes) for r in e.runs]


def entry_row(e: Entry) -> dict[str, Any]:
    """A run's row, or a group's: means over seeds in the run's keys, plus ``seeds``, ``spread`` and ``per_seed``."""
    _score(e)
    rows = [run_row(f"{e.name}/seed-{k}" if e.group else e.name, r, m)
            for k, r, (m, _) in zip(e.seeds, e.runs, e.metrics)]
    if not e.group:
        return {**rows[0], "seeds": 1}
    spread = aggregate_rows(rows, SPREAD_KEYS)
    row = {**rows[0], "run": e.name, "run_dir": str(e.path), "seeds": len(rows)}
    row.update({k: spread[k]["mean"] for k in SPREAD_KEYS})
    row["spread"] = spread
    row["per_seed"] = [{**r, "seed": k} for k, r in zip(e.seeds, rows)]
    return row


def entry_per_class(e: Entry) -> dict[str, Any]:
    """Per-class scores (mean over seeds for a group), micro/macro AUC, calibration and confusion matrix
    (of the first seed, and summed over seeds as ``confusion_matrix_sum``)."""
    _score(e)
    first = e.metrics[0][0]
    out = {k: first[k] for k in ("micro_auc", "macro_roc_curve_auc", "calibration", "confusion_matrix")}
    if e.group:
        out["per_class"] = {c: {k: float(np.mean([m["per_class"][c][k] for m, _ in e.metrics
                                                  if m["per_class"][c][k] is not None]))
                                if any(m["per_class"][c][k] is not None for m, _ in e.metrics) else None
                                for k in first["per_class"][c]} for c in first["per_class"]}
        out["confusion_matrix_sum"] = np.sum([np.asarray(m["confusion_matrix"]) for m, _ in e.metrics], 0).tolist()
    else:
        out["per_class"] = first["per_class"]
    return out


def compare_numbers(entries: Sequence[Entry]) -> dict[str, Any]:
    """Everything a comparison shows, JSON-ready except ``rocs`` (curves for the figure) and ``bands``."""
    rows = [entry_row(e) for e in entries]
    per_run = {e.name: entry_per_class(e) for e in entries}
    rocs = {e.name: e.metrics[0][1]["roc"] for e in entries}  # a group: its first seed's curves
    histories = {e.name: e.runs[0].history for e in entries if not e.group and e.runs[0].history.get("epoch")}
    bands = {e.name: mean_history([r.history for r in e.runs]) for e in entries if e.group}
    labels = entries[0].runs[0].labels
    significance = pairwise([(e.name, [r.logits for r in e.runs], e.seeds) for e in entries], labels)
    return {"runs": rows, "classes": entries[0].runs[0].classes, "num_test": int(len(labels)), "per_run": per_run,
            "significance": significance, "rocs": rocs, "histories": histories, "bands": bands}
