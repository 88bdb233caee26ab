"""The tracker interface every tracker module implements, and the helpers they share; imports no tracker
module, so that each can subclass :class:`Tracker` and the package can import them all."""


from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from ..errors import CifarlabError
from ..io import atomic_write_text

TRACKER_NAMES = ["wandb", "mlflow", "tensorboard"]
EPOCH_METRICS = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
SUMMARY_METRICS = ["best_val_acc", "best_epoch", "final_val_acc", "train_seconds", "images_per_second", "params"]
TEST_METRICS = ["test_loss", "test_acc"]


class TrackerError(CifarlabError):
    """A tracker is unknown, not installed, or cannot start."""


class Tracker:
    """One experiment tracker. Subclasses implement the primitives; :meth:`log_outputs` finds the files."""

    name = ""
    module = ""  # the library it needs; the extra has the tracker's name

    def __init__(self) -> None:
        if importlib.util.find_spec(self.module) is None:
            raise TrackerError(f"--tracker {self.name} needs the {self.module} package: "
                               f"pip install 'cifarlab[{self.name}]'")
        self.run_dir: Path | None = None

    def start(self, run_dir: Path, config: dict[str, Any], resumed: bool) -> None:
        raise NotImplementedError

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One ``metrics.csv`` row; its ``epoch`` is the step."""
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Final numbers of the run (summary, test metrics)."""
        raise NotImplementedError

    def log_figures(self, paths: list[Path]) -> None:
        raise NotImplementedError

    def log_tags(self, tags: dict[str, str]) -> None:
        """Text facts about the run (a sweep trial's ``trial_state``)."""
        raise NotImplementedError

    def finish(self, failed: bool = False) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def log_outputs(self) -> None:
        """Log what the run directory holds at the end: summary, test metrics, report figures."""
        assert self.run_dir is not None
        metrics: dict[str, float] = {}
        for fname, keys in (("summary.json", SUMMARY_METRICS), ("test_metrics.json", TEST_METRICS)):
            f = self.run_dir / fname
            if f.is_file():
                data = json.loads(f.read_text())
                metrics.update({k: float(data[k]) for k in keys if _is_number(data.get(k))})
        if metrics:
            self.log_metrics(metrics)
        figures = sorted((self.run_dir / "report").glob("*.png"))
        if figures:
            self.log_figures(figures)

    def _ids(self) -> dict[str, str]:
        """Tracker run ids kept in RUN_DIR/trackers.json, so that ``--resume`` continues the same tracker run."""
        f = self.run_dir / "trackers.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def _save_id(self, run_id: str) -> None:
        ids = self._ids()
        ids[self.name] = run_id
        atomic_write_text(self.run_dir / "trackers.json", json.dumps(ids, indent=2))


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row (validation is blank on epochs without it)."""
    return {k: float(row[k]) for k in EPOCH_METRICS if _is_number(row.get(k))}


def flatten_config(config: dict[str, Any]) -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``: the form trackers show as parameters."""
    flat = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v
        else:
            flat[section] = values
    return flat


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
