"""Experiment trackers: W&B, MLflow and TensorBoard, beside the run's own files.

A run always writes its local files (``config.yaml``, ``metrics.csv``, weights, report).
A tracker copies the same things into the tool a team already uses: the config when the
run starts, every epoch's metrics row, and at the end the summary, the test metrics and
the report figures that exist in the run directory by then. The interface is the small
one Lightning's loggers and Hugging Face's ``TrainerCallback`` integrations share:
start, log per epoch, finish. Each tool is an optional extra; a missing one is
reported before training starts, naming the extra to install.

Usage::

    with Trackers(["mlflow", "tensorboard"]) as trackers:
        summary = fit(cfg, trackers=trackers)
        evaluate_run(summary["run_dir"])        # test metrics and figures are logged at exit
"""

from __future__ import annotations

from typing import Any

from .base import (EPOCH_METRICS, SUMMARY_METRICS, TEST_METRICS, TRACKER_NAMES, Tracker,  # noqa: F401
                   TrackerError, epoch_metrics, flatten_config)
from .mlflow_tracker import MlflowTracker
from .tensorboard_tracker import TensorBoardTracker
from .wandb_tracker import WandbTracker

_CLASSES = {"wandb": WandbTracker, "mlflow": MlflowTracker, "tensorboard": TensorBoardTracker}


class Trackers(list):
    """The trackers named on the command line; a context manager that finishes them (as failed on an error).

    ``options`` maps a tracker's name to keyword arguments of its class (a sweep's W&B project and group).
    """

    def __init__(self, names: list[str] | None = None, options: dict[str, dict[str, Any]] | None = None):
        super().__init__()
        for name in dict.fromkeys(names or []):  # a repeated --tracker counts once
            self.append(create_tracker(name, **(options or {}).get(name, {})))

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(failed=exc_type is not None)

    def finish(self, failed: bool = False, tags: dict[str, str] | None = None) -> None:
        for tracker in self:
            if tracker.run_dir is None:  # never started: another rank, or the run failed before starting
                continue
            if tags:
                tracker.log_tags(tags)
            if not failed:
                tracker.log_outputs()
            tracker.finish(failed)
            tracker.run_dir = None


def create_tracker(name: str, **options: Any) -> Tracker:
    if name not in _CLASSES:
        raise TrackerError(f"unknown tracker {name!r}; choose from {', '.join(TRACKER_NAMES)}")
    return _CLASSES[name](**options)
