"""Read what a run directory holds: config, per-epoch metrics, summary and test logits."""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ..config import RunConfig, load_config
from ..errors import CifarlabError
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
        from ..evaluation import evaluate_run

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
