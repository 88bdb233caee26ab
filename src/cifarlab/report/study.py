"""The study report: one self-contained HTML page over every model of a study (``cifarlab study``).

Sections: the headline table (test accuracy over seeds, with intervals), the data at a glance,
each model's two sweeps (charts and ranked trials, CSV embedded), the best configurations, the final
training curves of all models on shared axes, confusion matrices, ROC curves, the seeds' spread and
the significance table. Numbers come from :mod:`cifarlab.evaluation.comparison` (test logits) and
the sweeps' storage; this module only draws and renders. Everything shown is also in ``study.json``.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from ..config import load_config
from ..evaluation.comparison import compare_numbers
from ..io import atomic_write_text
from ..sweep import open_study
from ..sweep.charts import write_report
from . import figures
from . import html as H
from .dataset import data_overview
from .groups import band_curves, seeds_spread, significance_table, spread_table
from .runs import json_safe, load_entries, warn

TOP_TRIALS_SHOWN = 10


def _csv_link(path: Path, label: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><a download="{H.esc(path.name)}" href="data:text/csv;base64,{data}">{H.esc(label)}</a></p>'


def _ranked_rows(csv_path: Path, metric: str, goal: str) -> list[dict[str, str]]:
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    done = [r for r in rows if r["state"] == "COMPLETE" and r["value"] != ""]
    done.sort(key=lambda r: float(r["value"]), reverse=goal == "maximize")
    return done + [r for r in rows if r not in done]


def _write_ranked(rows: list[dict[str, str]], path: Path) -> Path:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=["rank", *rows[0]])
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({"rank": i + 1 if r["state"] == "COMPLETE" and r["value"] != "" else "", **r})
    atomic_write_text(path, buf.getvalue())
    return path


def _sweep_section(st, out: Path, label: str) -> tuple[str, dict[str, Any]]:
    files = write_report(st, out)
    rows = _ranked_rows(files["csv"], st.spec.metric, st.spec.goal)
    ranked_csv = _write_ranked(rows, out / "trials_ranked.csv")
    params = [p.name for p in st.spec.params]
    shown = [[i + 1, r["number"], r["state"], *(r[p] for p in params), r["value"], r["epochs"], r["seconds"]]
             for i, r in enumerate(rows[:TOP_TRIALS_SHOWN])]
    html = (H.table(["rank", "trial", "state", *params, st.spec.metric, "epochs", "seconds"], shown)
            + _csv_link(ranked_csv, f"{label}: all {len(rows)} trials, ranked (CSV)"))
    captions = {"curves": "Validation metric of every trial per epoch (pruned trials stop early).",
                "params": "Final metric against each parameter.",
                "parallel": "Parallel coordinates: each line a trial, coloured by its metric.",
                "importance": "Parameter importance (Optuna's fANOVA)."}
    for key, cap in captions.items():
        if key in files:
            html += H.figure(files[key], f"{label}: {key}", f"{label}: {cap}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return html, {"study": st.name, "trials": len(rows), "states": counts, "ranked_csv": ranked_csv.name,
                  "best": rows[0] if rows and rows[0]["state"] == "COMPLETE" else None}


def make_study_report(spec, state: dict[str, Any], storage: str | None = None) -> Path:
    """Write ``STUDY_DIR/report/`` (``study.html``, ``study.json``, PNGs, CSVs); return the HTML's path."""
    matplotlib.use("Agg")

    out = spec.study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    dirs = spec.dirs()
    entries = load_entries([dirs[p.name]["final"] for p in spec.models])
    for e, p in zip(entries, spec.models):
        e.name = p.name
    nums = compare_numbers(entries)
    rows = nums["runs"]
    sections: list[tuple[str, str]] = []

    # headline
    head_rows = []
    for p, r in zip(spec.models, rows):
        best = state["models"].get(p.name, {}).get("best", {})
        acc, loss = (r.get("spread") or {}).get("test_acc", {}), (r.get("spread") or {}).get("test_loss", {})
        ci = f"[{acc['ci_low']:.4f}, {acc['ci_high']:.4f}]" if acc.get("ci_low") is not None else "–"
        head_rows.append([p.name, r["model"], r.get("seeds", 1), r["test_acc"], acc.get("std"), ci, r["test_loss"],
                          loss.get("std"), r["params"], r["epochs"], f"{best.get('stage', '?')} trial {best.get('trial', '?')}"])
    sections.append(("Headline", H.table(["model", "architecture", "seeds", "test accuracy (mean)", "std",
                                          "95% t-interval", "test loss (mean)", "std", "parameters", "epochs",
                                          "configuration from"], head_rows)
                     + "<p>Means over the final seeds; intervals are Student-t over seeds.</p>"))
    if nums["significance"]:
        sections.append(("Significance", significance_table(nums["significance"])))

    # data at a glance
    first_cfg = load_config(entries[0].runs[0].run_dir / "config.yaml")
    data_info = None
    try:
        data_info = data_overview(first_cfg, out / "data")
        data_html = H.table(["split", "images"], [[k, v] for k, v in data_info["totals"].items()])
        for name in data_info["figures"]:
            data_html += H.figure(out / "data" / name, name, {"class_counts.png": "Images per class and split.",
                                                               "samples.png": "The first training images of each class."}
                                  .get(name, ""))
        sections.append(("The data at a glance", data_html))
    except Exception as e:  # the data may have moved since training: the rest of the report stands
        warn(f"data overview skipped: {e}")
        sections.append(("The data at a glance", f'<p class="warn">skipped: {H.esc(e)}</p>'))

    # sweeps
    sweeps_json: dict[str, Any] = {}
    for p in spec.models:
        for stage in ("stage1", "stage2"):
            st = open_study(dirs[p.name][stage], storage)
            html, info = _sweep_section(st, out / "sweeps" / f"{p.name}-{stage}", f"{p.name} {stage.replace('stage', 'stage ')}")
            sweeps_json[f"{p.name}-{stage}"] = info
            sections.append((f"{p.name}: sweep {stage.replace('stage', 'stage ')} ({info['trials']} trials)", html))
        best = state["models"].get(p.name, {}).get("best")
        if best:
            cfg_text = Path(best["file"]).read_text() if Path(best["file"]).is_file() else ""
            sections.append((f"{p.name}: the configuration trained for the final runs",
                             f"<p>Best trial {best['trial']} of {best['stage']} ({best['metric']} = "
                             f"{best['value']:.4f}).</p><details><summary>best.yaml</summary><pre>"
                             f"{H.esc(cfg_text)}</pre></details>"))

    # final runs
    figs = [("Final training curves", band_curves(nums["histories"], nums["bands"], out / "final_curves.png",
                                                  "Final training of every model (mean over seeds, band ± one std)"),
             "Final runs of every model on shared axes: mean over seeds per epoch, band ± one standard deviation.")]
    for e in entries:
        cm = np.asarray(nums["per_run"][e.name].get("confusion_matrix_sum", nums["per_run"][e.name]["confusion_matrix"]))
        support = cm.sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            cm_norm = np.where(support > 0, cm / np.maximum(support, 1), np.nan)
        figs.append((f"Confusion matrix: {e.name}", figures.confusion_matrices(
            cm, cm_norm, nums["classes"], f"{e.name}: all {len(e.runs)} seeds' test predictions",
            out / f"confusion_{e.name}.png"), "Counts summed over the seeds (each test image once per seed)."))
    figs.append(("ROC curves", figures.compare_roc(nums["rocs"], out / "roc.png"),
                 "Macro (solid) and micro (dashed) one-vs-rest ROC curve of each model's first seed."))
    figs.append(("Seeds", seeds_spread(rows, out / "seeds.png"),
                 "Test accuracy of every final seed, with each model's mean and 95% t-interval."))
    sections.append(("Spread over seeds", spread_table(rows)))
    sections += [(h, H.figure(pth, h, cap)) for h, pth, cap in figs]
    sections.append(("Study file", f"<pre>{H.esc(spec.path.read_text())}</pre>"))

    result = {"study": spec.name, "study_dir": str(spec.study_dir), "models": [p.name for p in spec.models],
              "runs": rows, "significance": nums["significance"], "classes": nums["classes"],
              "num_test": nums["num_test"], "sweeps": sweeps_json, "state": state,
              "data": {k: data_info[k] for k in ("source", "totals")} if data_info else None,
              "figures": [pth.name for _, pth, _ in figs]}
    atomic_write_text(out / "study.json", json.dumps(json_safe(result), indent=2))
    page = H.page(f"Study: {spec.name}", f"{len(spec.models)} models · {nums['num_test']} test images · every test "
                  f"number from the final seeds' test_logits.npz; all numbers also in report/study.json", sections)
    atomic_write_text(out / "study.html", page)
    return out / "study.html"
