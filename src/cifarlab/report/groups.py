"""Rendering of seeds groups and of significance: mean curves with a band, the seeds' spread,
the significance table, and ``cifarlab report GROUP_DIR``. The numbers come from
:mod:`cifarlab.evaluation.comparison` / :mod:`cifarlab.evaluation.groups`; nothing is computed here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..evaluation.comparison import compare_numbers
from ..evaluation.significance import compare_pair, format_p
from ..io import atomic_write_text
from . import figures
from . import html as H
from .figures import _finite, _marker, _save, colour
from .runs import json_safe, load_entry


# ----------------------------------------------------------------------------- figures
def band_curves(histories: dict[str, dict[str, list[float]]], bands: dict[str, dict[str, Any]], path: Path,
                title: str = "Training curves (groups: mean over seeds, band: ± one standard deviation)") -> Path:
    """Like :func:`figures.compare_curves`: single runs as lines, groups as their mean with a ±1 std band."""
    fig = Figure(figsize=(13, 9))
    axes = fig.subplots(2, 2, sharex=True)
    panels = (("train_loss", "Training loss", "Cross-entropy loss"), ("val_loss", "Validation loss", "Cross-entropy loss"),
              ("train_acc", "Training accuracy", "Accuracy"), ("val_acc", "Validation accuracy", "Accuracy"))
    names = list(dict.fromkeys([*histories, *bands]))
    for ax, (key, name, ylabel) in zip(axes.flat, panels):
        for i, run in enumerate(names):
            if run in bands:
                b = bands[run]
                epochs = b["mean"].get("epoch", [])
                m = np.asarray(b["mean"].get(key, []), dtype=float)
                s = np.asarray(b["std"].get(key, []), dtype=float)
                x, y = _finite(epochs, m)
                if not len(x):
                    continue
                ok = np.isfinite(m)
                n_seeds = int(max(b["n"].get(key, [1]) or [1]))
                ax.plot(x, y, color=colour(i), marker=_marker(len(x)), label=f"{run} (mean of {n_seeds} seeds)")
                ax.fill_between(x, (m - s)[ok], (m + s)[ok], color=colour(i), alpha=0.2, lw=0)
            else:
                h = histories[run]
                x, y = _finite(h.get("epoch", []), h.get(key, []))
                if len(x):
                    ax.plot(x, y, color=colour(i), marker=_marker(len(x)), label=run)
        ax.set_title(name)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    figures.finish_curve_grid(fig, axes, max_cols=3)  # as compare_curves
    fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)


def seeds_spread(rows: Sequence[dict[str, Any]], path: Path, key: str = "test_acc",
                 label: str = "Test accuracy") -> Path:
    """Each model's per-seed values as points, with its mean and 95% t-interval."""
    fig = Figure(figsize=(max(6, 1.8 * len(rows) + 2), 4.8))
    ax = fig.subplots()
    for i, r in enumerate(rows):
        vals = [s[key] for s in r.get("per_seed", [r])]
        jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(1)
        ax.scatter(i + jitter, vals, color=colour(i), s=36, zorder=3, label=f"{r['run']}: {len(vals)} seed(s)")
        sp = (r.get("spread") or {}).get(key)
        if sp and sp["ci_low"] is not None:
            ax.errorbar([i + 0.28], [sp["mean"]], yerr=[[sp["mean"] - sp["ci_low"]], [sp["ci_high"] - sp["mean"]]],
                        fmt="D", color="black", capsize=5, ms=6, zorder=4)
            ax.annotate(f"{sp['mean']:.4f}\n[{sp['ci_low']:.4f}, {sp['ci_high']:.4f}]", (i + 0.34, sp["mean"]),
                        fontsize=8, va="center")
    ax.set_xticks(range(len(rows)), [r["run"] for r in rows])
    ax.set_xlim(-0.6, len(rows) - 0.1)
    ax.set_xlabel("Model")
    ax.set_ylabel(label)
    ax.set_title(f"{label} of every seed (points); mean and 95% t-interval over seeds (black)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- tables
def _ci(lo: float | None, hi: float | None) -> str:
    return "–" if lo is None or hi is None else f"[{lo:+.4f}, {hi:+.4f}]"


def significance_table(sig: Sequence[dict[str, Any]]) -> str:
    """Every pair: accuracies, difference with its 95% interval, McNemar's n01 / n10 / p, and the verdict.
    Groups add a row per seed pair below their over-seeds row."""
    header = ["A", "B", "accuracy A", "accuracy B", "A − B", "95% interval", "test", "n01 (A wrong, B right)",
              "n10 (A right, B wrong)", "p", "verdict"]
    rows = []
    for p in sig:
        if "over_seeds" in p:
            o = p["over_seeds"]
            rows.append([p["a"], p["b"], p["acc_a"], p["acc_b"], f"{p['acc_diff']:+.4f}", _ci(o["ci_low"], o["ci_high"]),
                         f"Welch t over seeds ({o['n_a']} vs {o['n_b']})", "–", "–",
                         format_p(o["p_value"]) if o["p_value"] is not None else "–",
                         f"{p['verdict']}; {p['verdict_per_seed']}"])
            pairs = p["per_seed"]
        else:
            pairs = [p]
        for q in pairs:
            b, mc = q["bootstrap"], q["mcnemar"]
            rows.append([q["a"], q["b"], q["acc_a"], q["acc_b"], f"{q['acc_diff']:+.4f}", _ci(b["ci_low"], b["ci_high"]),
                         "McNemar exact; paired bootstrap", mc["n01"], mc["n10"], format_p(mc["p_value"]), q["verdict"]])
    note = ("<p>McNemar's exact test uses only the test images on which the two models disagree (n01 + n10); the "
            "interval is a paired bootstrap of the accuracy difference (10,000 resamples of the test images), or "
            "for groups Welch's t-interval over seeds. p &lt; 0.05 is called a difference; with many pairs, some "
            "such calls are expected by chance.</p>")
    return H.table(header, rows) + note


def spread_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per model: seeds, mean ± std and 95% t-interval of test accuracy and loss."""
    out = []
    for r in rows:
        sp = r.get("spread") or {}
        acc, loss = sp.get("test_acc") or {}, sp.get("test_loss") or {}
        out.append([r["run"], r.get("seeds", 1), r["test_acc"], acc.get("std"), _ci(acc.get("ci_low"), acc.get("ci_high")),
                    r["test_loss"], loss.get("std"), _ci(loss.get("ci_low"), loss.get("ci_high"))])
    return H.table(["model", "seeds", "test accuracy (mean)", "std", "95% t-interval", "test loss (mean)", "std",
                    "95% t-interval"], out)


# ----------------------------------------------------------------------------- group report
def make_group_report(group_dir: str | Path) -> Path:
    """``GROUP_DIR/report/``: the seeds table, mean and 95% interval, mean curves with a band, the seeds'
    spread, confusion matrices summed over seeds, every seed's ROC, and the significance between seeds."""
    e = load_entry(group_dir)
    out = Path(group_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    nums = compare_numbers([e])
    row = nums["runs"][0]
    figs = []
    if e.group and nums["bands"][e.name]["mean"]:
        figs.append(("Training curves", band_curves({}, nums["bands"], out / "curves.png",
                                                    f"{e.name}: mean over seeds with a ± one std band"),
                     "Mean over seeds of each epoch's training and validation loss and accuracy; the band is ± one "
                     "standard deviation over seeds."))
    elif e.runs[0].history.get("epoch"):
        figs.append(("Training curves", figures.training_curves(e.runs[0].history, e.name, out / "curves.png"), ""))
    figs.append(("Seeds", seeds_spread([row], out / "seeds.png"),
                 "Test accuracy of every seed, with the mean and its 95% Student-t interval."))
    cm = np.asarray(nums["per_run"][e.name].get("confusion_matrix_sum", nums["per_run"][e.name]["confusion_matrix"]))
    support = cm.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        cm_norm = np.where(support > 0, cm / np.maximum(support, 1), np.nan)
    figs.append(("Confusion matrix", figures.confusion_matrices(cm, cm_norm, nums["classes"],
                                                                f"{e.name}: all seeds' predictions", out / "confusion.png"),
                 "Counts summed over the seeds' test predictions (each test image counted once per seed)."))
    rocs = {f"seed-{k}": m[1]["roc"] for k, m in zip(e.seeds, e.metrics)}
    figs.append(("ROC curves", figures.compare_roc(rocs, out / "roc.png"), "Macro and micro ROC curve of every seed."))
    sig = []
    if len(e.runs) > 1:  # seed k against seed 0: how much do two seeds of one config disagree?
        sig = [compare_pair(f"seed-{e.seeds[k]}", f"seed-{e.seeds[0]}", e.runs[k].logits, e.runs[0].logits,
                            e.runs[0].labels) for k in range(1, len(e.runs))]
    result = {"group": e.name, "group_dir": str(e.path), "row": row, "significance_between_seeds": sig,
              "figures": [p.name for _, p, _ in figs]}
    atomic_write_text(out / "group.json", json.dumps(json_safe(result), indent=2))
    seed_rows = [[s["seed"], s["test_loss"], s["test_acc"], s["macro_auc"], s["ece"], s["best_val_acc"],
                  s["train_seconds"]] for s in row.get("per_seed", [{**row, "seed": e.seeds[0]}])]
    sections = [("Over seeds", spread_table([row])),
                ("Seeds", H.table(["seed", "test loss", "test accuracy", "macro AUC", "ECE", "best val. accuracy",
                                   "training time (s)"], seed_rows))]
    sections += [(h, H.figure(p, h, cap)) for h, p, cap in figs]
    if sig:
        sections.append(("Seed against seed (same config)", significance_table(sig)))
    sections.append(("Configuration (seed 0)", f"<pre>{H.esc(e.runs[0].config_text)}</pre>"))
    page = H.page(f"Group report: {e.name}", f"{len(e.runs)} seeds · {e.runs[0].config.model.name} · {e.path} · "
                  f"every number from the seeds' test_logits.npz; also in report/group.json", sections)
    atomic_write_text(out / "report.html", page)
    return out / "report.html"
