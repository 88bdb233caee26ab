"""Read what a run directory holds (config, per-epoch metrics, summary and test logits), and load runs and
seeds groups as the entries of a comparison (:func:`load_entries`)."""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import RunConfig, load_config
from ..errors import CifarlabError
from ..evaluation.comparison import Entry
from ..evaluation.evaluate import evaluate_run
from ..evaluation.groups import finished_members, is_group
from ..io import read_json


@dataclass
class RunFiles:
    run_dir: Path
    name: str
    config: RunConfig
    config_text: str
    history: dict[str, list[float]]  # metrics.csv columns; NaN where an epoch has no validation
    summary: dict[str, Any]
    logits: np.ndarray  # (N, C) float32
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    test_metrics: dict[str, Any] = field(default_factory=dict)
    weights_meta: dict[str, Any] = field(default_factory=dict)


def read_history(path: Path) -> dict[str, list[float]]:
    """metrics.csv as columns of floats; empty cells (epochs without validation) become NaN."""
    cols: dict[str, list[float]] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            for name in reader.fieldnames or []:
                cols[name] = []
            for row in reader:
                for k in cols:
                    v = row.get(k)
                    cols[k].append(float(v) if v not in (None, "") else math.nan)
    except (OSError, ValueError) as e:
        raise CifarlabError(f"cannot read {path}: {e}") from None
    if "epoch" not in cols:
        raise CifarlabError(f"{path} has no 'epoch' column")
    return cols


def load_run(run_dir: str | Path, evaluate_if_missing: bool = True) -> RunFiles:
    """Load a run's files. The test logits are never recomputed when ``test_logits.npz`` exists;
    when it is missing the run is evaluated once (:func:`cifarlab.evaluation.evaluate_run`)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CifarlabError(f"{run_dir} is not a run directory (no config.yaml)")
    logits_path = run_dir / "test_logits.npz"
    if not logits_path.is_file():
        if not evaluate_if_missing:
            raise CifarlabError(f"{run_dir} has no test_logits.npz; run: cifarlab evaluate {run_dir}")
        if not (run_dir / "best.safetensors").is_file():
            raise CifarlabError(f"{run_dir} has neither test_logits.npz nor best.safetensors to evaluate")
        print(f"{run_dir}: no test_logits.npz, evaluating the best weights on the test set first")
        evaluate_run(run_dir)
    try:
        with np.load(logits_path, allow_pickle=False) as z:
            logits, labels = z["logits"], z["labels"].astype(np.int64)
            classes = [str(c) for c in z["classes"]]
    except (OSError, KeyError, ValueError) as e:
        raise CifarlabError(f"cannot read {logits_path}: {e}") from None
    config_text = (run_dir / "config.yaml").read_text()
    config = load_config(run_dir / "config.yaml")
    history = read_history(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else {}
    return RunFiles(run_dir=run_dir, name=run_dir.name, config=config, config_text=config_text, history=history,
                    summary=read_json(run_dir / "summary.json"), logits=logits, labels=labels, classes=classes,
                    test_metrics=read_json(run_dir / "test_metrics.json"),
                    weights_meta=read_json(run_dir / "best.json"))


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


def load_entry(path: str | Path) -> Entry:
    """A run directory, or a seeds group directory (``cifarlab train --seeds N``) as one entry."""
    path = Path(path)
    if is_group(path):
        found = finished_members(path)
        return Entry(name=path.name, path=path, runs=[load_run(d) for _, d in found], seeds=[k for k, _ in found],
                     group=True)
    r = load_run(path)
    return Entry(name=r.name, path=path, runs=[r], seeds=[r.config.train.seed])


def load_entries(paths: Sequence[str | Path]) -> list[Entry]:
    """Entries with unique names, refused when a run appears twice or the test sets differ."""
    entries = [load_entry(d) for d in paths]
    runs = [r for e in entries for r in e.runs]
    if len({r.run_dir.resolve() for r in runs}) != len(runs):
        raise CifarlabError("the same run directory is given twice")
    check_compatible(runs)

    class _N:  # _unique_names reads .name and .run_dir
        def __init__(self, e):
            self.name, self.run_dir = e.name, e.path

    for e, n in zip(entries, _unique_names([_N(e) for e in entries])):
        e.name = n
    return entries


def warn(msg: str) -> None:
    print(f"cifarlab: warning: {msg}", file=sys.stderr)


def json_safe(x: Any) -> Any:
    """NaN / inf become null so the file is strict JSON; numpy scalars become Python numbers."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
