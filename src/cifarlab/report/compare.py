"""``compare_runs(RUN_DIRS)``: the study's comparison of models trained on the same data.

Training curves of all runs on shared axes, one table of test loss, accuracy,
macro AUC, ECE, parameters, training time and throughput, and every run's ROC
curves on one chart. Every number comes from each run's saved test logits, so
all runs are scored by the same code on the same test images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import CifarlabError
from ..train.checkpoint import atomic_write_text
from . import figures
from . import html as H
from .metrics import classification_metrics
from .runs import RunFiles, json_safe, load_run, warn


class IncompatibleRuns(CifarlabError):
    """Runs trained or tested on different data or class lists cannot be compared."""


def check_compatible(runs: Sequence[RunFiles]) -> None:
    """Refuse runs whose class lists, image sizes or test sets differ, naming the first that differs."""
    ref = runs[0]
    for r in runs[1:]:
        if r.classes != ref.classes:
            raise IncompatibleRuns(f"cannot compare {ref.run_dir} and {r.run_dir}: different classes "
                                   f"({', '.join(ref.classes)} vs {', '.join(r.classes)})")
        if r.config.data.image_size != ref.config.data.image_size:
            raise IncompatibleRuns(f"cannot compare {ref.run_dir} and {r.run_dir}: different data "
                                   f"(image size {ref.config.data.image_size} vs {r.config.data.image_size})")
        if len(r.labels) != len(ref.labels) or not np.array_equal(r.labels, ref.labels):
            raise IncompatibleRuns(f"cannot compare {ref.run_dir} and {r.run_dir}: different data (their test sets "
                                   f"differ: {len(ref.labels)} vs {len(r.labels)} images or different labels)")
    sources = {str(r.summary.get("data_source", r.config.data.path)) for r in runs}
    if len(sources) > 1:  # same test labels, so most likely the same data at two paths
        warn(f"the runs name different data locations ({', '.join(sorted(sources))}); their test sets match")


def _unique_names(runs: Sequence[RunFiles]) -> list[str]:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{r.run_dir.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write ``comparison.html``, ``comparison.json`` and the comparison PNGs to ``out``
    (default: ``comparison/`` beside the first run) and return the HTML's path."""
    if not run_dirs:
        raise CifarlabError("compare needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    if len({r.run_dir.resolve() for r in runs}) != len(runs):
        raise CifarlabError("the same run directory is given twice")
    check_compatible(runs)
    out = Path(out) if out is not None else runs[0].run_dir.parent / "comparison"
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_names(runs)

    rows: list[dict[str, Any]] = []
    rocs: dict[str, dict[str, Any]] = {}
    per_run: dict[str, dict[str, Any]] = {}
    for name, r in zip(names, runs):
        m, ex = classification_metrics(r.logits, r.labels, r.classes)
        rocs[name] = ex["roc"]
        s = r.summary
        rows.append({"run": name, "model": r.config.model.name, "run_dir": str(r.run_dir),
                     "test_loss": m["test_loss"], "test_acc": m["top1_accuracy"], "top2_acc": m["top2_accuracy"],
                     "macro_auc": m["macro_auc"], "macro_f1": m["macro_f1"], "ece": m["ece"],
                     "params": s.get("params", r.weights_meta.get("params")), "train_seconds": s.get("train_seconds"),
                     "images_per_second": s.get("images_per_second"), "epochs": s.get("epochs"),
                     "tta": r.test_metrics.get("tta"),
                     "best_val_acc": s.get("best_val_acc"), "train_images": s.get("train_images"),
                     "device": s.get("device")})
        per_run[name] = {k: m[k] for k in ("per_class", "micro_auc", "macro_roc_curve_auc", "calibration",
                                           "confusion_matrix")}

    figs = []
    histories = {n: r.history for n, r in zip(names, runs) if r.history.get("epoch")}
    if histories:
        figs.append(("Training curves", figures.compare_curves(histories, out / "compare_curves.png"),
                     "Training (per-epoch mean, with augmentation) and validation loss and accuracy of every run; "
                     "panels in a row share their y axis."))
    figs.append(("ROC curves", figures.compare_roc(rocs, out / "compare_roc.png"),
                 "Macro-average (solid: per-class one-vs-rest curves averaged) and micro-average (dashed) ROC "
                 "curve of every run on the same test set."))
    figs.append(("Scores", figures.compare_bars(rows, out / "compare_scores.png"),
                 "Test accuracy, macro AUC (higher is better) and expected calibration error (lower is better)."))

    result = {"runs": rows, "classes": runs[0].classes, "num_test": int(len(runs[0].labels)),
              "per_run": per_run, "figures": [p.name for _, p, _ in figs]}
    atomic_write_text(out / "comparison.json", json.dumps(json_safe(result), indent=2))

    header = ["run", "model", "test loss", "test accuracy", "TTA", "top-2 accuracy", "macro AUC", "macro F1", "ECE",
              "parameters", "training time (s)", "images / s", "epochs", "best val. accuracy (no TTA)"]
    table_rows = [[r["run"], r["model"], r["test_loss"], r["test_acc"], r["tta"] or "?", r["top2_acc"], r["macro_auc"],
                   r["macro_f1"], r["ece"], r["params"], r["train_seconds"], r["images_per_second"], r["epochs"],
                   r["best_val_acc"]] for r in rows]
    pc_header = ["class"] + [f"{n}: accuracy" for n in names] + [f"{n}: F1" for n in names]
    pc_rows = [[c] + [per_run[n]["per_class"][c]["accuracy"] for n in names]
               + [per_run[n]["per_class"][c]["f1"] for n in names] for c in runs[0].classes]
    sections = [("Summary", H.table(header, table_rows)),
                ("Per class", H.table(pc_header, pc_rows))]
    sections += [(h, H.figure(p, h, cap)) for h, p, cap in figs]
    configs = "".join(f"<details><summary>{H.esc(n)} ({H.esc(r.run_dir)})</summary><pre>{H.esc(r.config_text)}"
                      f"</pre></details>" for n, r in zip(names, runs))
    sections.append(("Configurations", configs))
    page = H.page(f"Comparison of {len(runs)} run{'s' if len(runs) != 1 else ''}",
                  f"{', '.join(names)} · {len(runs[0].labels)} test images · every number from each run's "
                  f"test_logits.npz; all numbers also in comparison.json", sections)
    atomic_write_text(out / "comparison.html", page)
    return out / "comparison.html"
