"""``sweep report``: the trial table as CSV and four PNG charts, drawn with plain matplotlib
(``optuna.visualization.matplotlib`` is marked experimental): validation curves of the best
trials, the metric against each hyperparameter, parallel coordinates, and hyperparameter
importances (``optuna.importance.get_param_importances``, fANOVA by default)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .results import Study, trial_rows, write_csv
from .spec import Param

BEST_CURVES = 30


def _save_png(fig, path: Path) -> None:
    from ..io import atomic_write  # a kill mid-write must not leave a torn PNG

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def write_report(s: Study, out: str | Path | None = None) -> dict[str, Path]:
    """Write ``trials.csv`` and the charts into ``out`` (default: ``<sweep dir>/report``); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out) if out is not None else (s.sweep_dir or Path(".")) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(s)
    files = {"csv": write_csv(rows, out / "trials.csv")}
    histories = {t.number: t.user_attrs.get("history") or {} for t in s.study.get_trials(deepcopy=False)}
    files["curves"] = _curves(s, rows, histories, out / "curves.png")
    if s.spec.params:
        files["params"] = _metric_vs_params(s, rows, out / "params.png")
        files["parallel"] = _parallel(s, rows, out / "parallel.png")
    imp = _importances(s, out / "importance.png")
    if imp is not None:
        files["importance"] = imp
    return files


# --------------------------------------------------------------------------- helpers
def _trial_metric(s: Study, rows: list[dict]) -> list[tuple[dict, float]]:
    key = {"val_acc": "final_val_acc", "val_loss": "final_val_loss"}.get(s.spec.metric)
    out = []
    for r in rows:
        v = r["value"] if r["value"] != "" else (r.get(key, "") if key else "")
        if v != "" and r["state"] in ("COMPLETE", "PRUNED"):
            out.append((r, float(v)))
    return out


def _axis_values(p: Param, rows: list[dict]) -> tuple[list[float], list[str] | None]:
    """Numeric positions of a parameter's values; categorical ones get indices and tick labels."""
    if p.kind == "categorical":
        labels = [str(_norm(c)) for c in p.choices]  # the same text as the CSV shows
        return [labels.index(str(r[p.name])) if str(r[p.name]) in labels else math.nan for r in rows], labels
    return [float(r[p.name]) if r[p.name] != "" else math.nan for r in rows], None


def _norm(c: Any) -> Any:
    import yaml

    return yaml.safe_dump(c, default_flow_style=True).strip() if isinstance(c, (list, dict)) else c


def _curves(s: Study, rows: list[dict], histories: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    scored = []
    for r in rows:
        acc = [v for v in (histories[r["number"]].get("val_acc") or []) if v is not None]
        if acc:
            scored.append((max(acc), r))
    scored.sort(key=lambda x: -x[0])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, (_, r) in enumerate(scored[:BEST_CURVES]):
        h = histories[r["number"]]
        style = "--" if r["state"] == "PRUNED" else "-"
        color = cmap(i / max(1, min(BEST_CURVES, len(scored)) - 1))
        for ax, key in zip(axes, ("val_acc", "val_loss")):
            ys = h.get(key) or []
            xs = [e + 1 for e, y in enumerate(ys) if y is not None]
            ax.plot(xs, [y for y in ys if y is not None], style, color=color, lw=1.2, alpha=0.85,
                    label=f"trial {r['number']}" if key == "val_acc" and i < 10 else None)
    for ax, title in zip(axes, ("validation accuracy", "validation loss")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(f"{title}, best {min(BEST_CURVES, len(scored))} trials (dashed: pruned)")
        ax.grid(alpha=0.3)
    if scored:
        axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"sweep {s.name}")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def _metric_vs_params(s: Study, rows: list[dict], path: Path) -> Path:
    import matplotlib.pyplot as plt

    pts = _trial_metric(s, rows)
    n = len(s.spec.params)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.6 * nrows), squeeze=False)
    for ax, p in zip(axes.flat, s.spec.params):
        xs, labels = _axis_values(p, [r for r, _ in pts])
        for state, marker, color in (("COMPLETE", "o", "tab:blue"), ("PRUNED", "x", "tab:red")):
            sel = [(x, v) for x, (r, v) in zip(xs, pts) if r["state"] == state and not math.isnan(x)]
            if sel:
                ax.scatter([x for x, _ in sel], [v for _, v in sel], marker=marker, color=color, s=22,
                           label=state.lower())
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        elif p.log:
            ax.set_xscale("log")
        ax.set_xlabel(p.name)
        ax.set_ylabel(s.spec.metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"sweep {s.name}: {s.spec.metric} against each hyperparameter (pruned: last value reached)")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def _parallel(s: Study, rows: list[dict], path: Path) -> Path:
    """Parallel coordinates: one line per finished trial across the parameters (scaled to [0, 1]) and the metric."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    pts = _trial_metric(s, rows)
    params = s.spec.params
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * (len(params) + 1)), 4.8))
    cols, ticks = [], []
    for p in params:
        xs, labels = _axis_values(p, [r for r, _ in pts])
        if labels is not None:
            lo, hi = 0, max(1, len(labels) - 1)
            ticks.append(labels)
        else:
            f = (lambda v: math.log(v) if v > 0 else math.nan) if p.log else (lambda v: v)
            xs = [f(x) for x in xs]
            lo, hi = float(p.low if not p.log else math.log(p.low)), float(p.high if not p.log else math.log(p.high))
            ticks.append([f"{p.low:.3g}", f"{p.high:.3g}"])
        span = (hi - lo) or 1.0
        cols.append([(x - lo) / span for x in xs])
    values = [v for _, v in pts]
    if values:
        vlo, vhi = min(values), max(values)
        cols.append([(v - vlo) / ((vhi - vlo) or 1.0) for v in values])
        norm = Normalize(vlo, vhi)
        cmap = plt.get_cmap("viridis" if s.spec.goal == "maximize" else "viridis_r")
        order = sorted(range(len(values)), key=lambda i: values[i] if s.spec.goal == "maximize" else -values[i])
        for i in order:  # best last, drawn on top
            ys = [c[i] for c in cols]
            ax.plot(range(len(cols)), ys, color=cmap(norm(values[i])), lw=1.5,
                    ls="--" if pts[i][0]["state"] == "PRUNED" else "-", alpha=0.8)
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=s.spec.metric)
        ticks.append([f"{vlo:.3g}", f"{vhi:.3g}"])
    names = [p.name for p in params] + [s.spec.metric]
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    for i, t in enumerate(ticks):
        ax.text(i, -0.08, t[0], ha="center", va="top", fontsize=7, color="0.3")
        ax.text(i, 1.04, t[-1], ha="center", va="bottom", fontsize=7, color="0.3")
        ax.axvline(i, color="0.8", lw=0.8, zorder=0)
    ax.set_ylim(-0.15, 1.12)
    ax.set_yticks([])
    ax.set_title(f"sweep {s.name}: parallel coordinates (dashed: pruned)", pad=18)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def _importances(s: Study, path: Path) -> Path | None:
    """fANOVA importances need two or more completed trials over a varying space; else no chart."""
    import warnings

    import matplotlib.pyplot as plt
    import optuna

    done = [t for t in s.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(done) < 2 or not s.spec.params:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(s.study)
    except (RuntimeError, ValueError, ZeroDivisionError):
        return None
    if not imp:
        return None
    names = list(imp)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.5))
    ax.barh(names, [imp[n] for n in names], color="tab:blue")
    ax.set_xlabel(f"importance for {s.spec.metric} (fANOVA, {len(done)} completed trials)")
    ax.set_title(f"sweep {s.name}: hyperparameter importances")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path
