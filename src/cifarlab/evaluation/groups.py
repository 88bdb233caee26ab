"""Groups of runs: one config trained with several seeds (``cifarlab train --seeds N``), and their
aggregate numbers (mean, standard deviation and Student-t 95% interval over seeds; mean curves).

A group directory ``runs/NAME/`` holds ``group.json`` and one run directory per seed,
``seed-0/``, ``seed-1/``, ... (see :mod:`cifarlab.train.group`). Anything that takes a run
directory in ``compare`` and ``report`` also takes a group directory.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import CifarlabError
from ..io import read_json
from .significance import t_interval

GROUP_FILE = "group.json"
SEED_DIR = re.compile(r"seed-(\d+)")


def seed_dir(group_dir: str | Path, k: int) -> Path:
    return Path(group_dir) / f"seed-{k}"


def is_group(path: str | Path) -> bool:
    """A group directory: ``group.json``, or no ``config.yaml`` of its own and ``seed-K/`` runs below."""
    path = Path(path)
    if (path / GROUP_FILE).is_file():
        return True
    return path.is_dir() and not (path / "config.yaml").is_file() and bool(members(path))


def members(group_dir: str | Path) -> list[tuple[int, Path]]:
    """``(K, seed-K/)`` of every seed run that has a config, by K."""
    group_dir = Path(group_dir)
    out = []
    for d in group_dir.iterdir() if group_dir.is_dir() else ():
        m = SEED_DIR.fullmatch(d.name)
        if m and (d / "config.yaml").is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def read_group(group_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(group_dir) / GROUP_FILE)


def finished_members(group_dir: str | Path) -> list[tuple[int, Path]]:
    """The seed runs a report can use: trained to the end (``summary.json``) with best weights or test logits."""
    runs = [(k, d) for k, d in members(group_dir)
            if (d / "summary.json").is_file() and ((d / "best.safetensors").is_file() or (d / "test_logits.npz").is_file())]
    if not runs:
        raise CifarlabError(f"group {group_dir} has no finished seed run (seed-K/ with summary.json); "
                            f"finish it with the same `cifarlab train ... --seeds N` command")
    return runs


def aggregate(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, standard deviation (n-1) and 95% t-interval over seeds; see :func:`significance.t_interval`."""
    return t_interval([float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))])


def aggregate_rows(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{key: aggregate([row[key] for row in rows])}`` for the numeric keys of per-seed rows."""
    return {k: aggregate([r.get(k) for r in rows if isinstance(r.get(k), (int, float))]) for k in keys}


def mean_history(histories: Sequence[dict[str, list[float]]]) -> dict[str, dict[str, list[float]]]:
    """Per-epoch mean and standard deviation of each metrics.csv column over seeds.

    Seeds are aligned by epoch up to the shortest history; NaN cells (epochs without validation)
    are left out of the mean. Returns ``{"mean": {col: [...]}, "std": {col: [...]}, "n": {col: [...]}}``.
    """
    histories = [h for h in histories if h.get("epoch")]
    if not histories:
        return {"mean": {}, "std": {}, "n": {}}
    length = min(len(h["epoch"]) for h in histories)
    cols = [c for c in histories[0] if all(c in h for h in histories)]
    mean: dict[str, list[float]] = {}
    std: dict[str, list[float]] = {}
    count: dict[str, list[float]] = {}
    for c in cols:
        x = np.array([h[c][:length] for h in histories], dtype=np.float64)  # (seeds, epochs)
        ok = np.isfinite(x)
        n = ok.sum(0)
        s = np.where(ok, x, 0).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            m = np.where(n > 0, s / np.maximum(n, 1), np.nan)
            var = np.where(n > 1, (np.where(ok, x - m, 0) ** 2).sum(0) / np.maximum(n - 1, 1), 0.0)
        mean[c], std[c], count[c] = m.tolist(), np.sqrt(var).tolist(), n.astype(float).tolist()
    return {"mean": mean, "std": std, "n": count}
