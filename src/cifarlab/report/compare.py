"""``compare_runs(RUN_DIRS)``: the study's comparison of models trained on the same data.

Training curves of all runs on shared axes, one table of test loss, accuracy,
macro AUC, ECE, parameters, training time and throughput, and every run's ROC
curves on one chart, and for every pair of models the accuracy difference with a paired
bootstrap interval and McNemar's exact test. Every number comes from each run's saved test
logits, so all runs are scored by the same code on the same test images; the numbers are
computed in :mod:`cifarlab.evaluation.comparison`, this module renders them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..errors import CifarlabError
from ..evaluation.comparison import compare_numbers
from ..io import atomic_write_text
from . import figures
from . import html as H
from .groups import band_curves, seeds_spread, significance_table, spread_table
from .runs import json_safe, load_entries


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write ``comparison.html``, ``comparison.json`` and the comparison PNGs to ``out``
    (default: ``comparison/`` beside the first run) and return the HTML's path.

    A seeds group counts as one model: its row holds means over seeds with their spread, its curves
    are a mean with a band, and its significance is tested over seeds and per seed."""
    if not run_dirs:
        raise CifarlabError("compare needs at least one run directory")
    entries = load_entries(run_dirs)
    out = Path(out) if out is not None else entries[0].path.parent / "comparison"
    out.mkdir(parents=True, exist_ok=True)
    nums = compare_numbers(entries)
    names = [e.name for e in entries]
    rows, per_run, rocs = nums["runs"], nums["per_run"], nums["rocs"]
    any_group = any(e.group for e in entries)

    figs = []
    if nums["bands"]:
        figs.append(("Training curves", band_curves(nums["histories"], nums["bands"], out / "compare_curves.png"),
                     "Training (per-epoch mean, with augmentation) and validation loss and accuracy of every run; "
                     "a group is its mean over seeds with a band of ± one standard deviation; panels in a row share "
                     "their y axis."))
    elif nums["histories"]:
        figs.append(("Training curves", figures.compare_curves(nums["histories"], out / "compare_curves.png"),
                     "Training (per-epoch mean, with augmentation) and validation loss and accuracy of every run; "
                     "panels in a row share their y axis."))
    figs.append(("ROC curves", figures.compare_roc(rocs, out / "compare_roc.png"),
                 "Macro-average (solid: per-class one-vs-rest curves averaged) and micro-average (dashed) ROC "
                 "curve of every run on the same test set" + ("; a group: its first seed." if any_group else ".")))
    figs.append(("Scores", figures.compare_bars(rows, out / "compare_scores.png"),
                 "Test accuracy, macro AUC (higher is better) and expected calibration error (lower is better)"
                 + ("; a group: its mean over seeds." if any_group else ".")))
    if any_group:
        figs.append(("Seeds", seeds_spread(rows, out / "compare_seeds.png"),
                     "Test accuracy of every seed, with each group's mean and 95% Student-t interval."))

    result = {k: nums[k] for k in ("runs", "classes", "num_test", "per_run", "significance")}
    result["figures"] = [p.name for _, p, _ in figs]
    atomic_write_text(out / "comparison.json", json.dumps(json_safe(result), indent=2))

    header = ["run", "model", "test loss", "test accuracy", "TTA", "top-2 accuracy", "macro AUC", "macro F1", "ECE",
              "parameters", "training time (s)", "images / s", "epochs", "best val. accuracy (no TTA)"]
    table_rows = [[r["run"], r["model"], r["test_loss"], r["test_acc"], r["tta"] or "?", r["top2_acc"], r["macro_auc"],
                   r["macro_f1"], r["ece"], r["params"], r["train_seconds"], r["images_per_second"], r["epochs"],
                   r["best_val_acc"]] for r in rows]
    pc_header = ["class"] + [f"{n}: accuracy" for n in names] + [f"{n}: F1" for n in names]
    pc_rows = [[c] + [per_run[n]["per_class"][c]["accuracy"] for n in names]
               + [per_run[n]["per_class"][c]["f1"] for n in names] for c in nums["classes"]]
    sections = [("Summary", H.table(header, table_rows) + ("<p>Groups: means over seeds.</p>" if any_group else "")),
                ("Per class", H.table(pc_header, pc_rows))]
    sections += [(h, H.figure(p, h, cap)) for h, p, cap in figs]
    if any_group:
        sections.append(("Spread over seeds", spread_table(rows)))
    if nums["significance"]:
        sections.append(("Significance", significance_table(nums["significance"])))
    configs = "".join(f"<details><summary>{H.esc(e.name)} ({H.esc(e.path)})</summary><pre>"
                      f"{H.esc(e.runs[0].config_text)}</pre></details>" for e in entries)
    sections.append(("Configurations", configs))
    n_test = nums["num_test"]
    page = H.page(f"Comparison of {len(entries)} run{'s' if len(entries) != 1 else ''}",
                  f"{', '.join(names)} · {n_test} test images · every number from each run's "
                  f"test_logits.npz; all numbers also in comparison.json", sections)
    atomic_write_text(out / "comparison.html", page)
    return out / "comparison.html"
