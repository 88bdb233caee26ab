"""MLflow: a local SQLite tracking store beside the runs, or any ``MLFLOW_TRACKING_URI``.

Uses :class:`mlflow.MlflowClient` rather than the fluent ``mlflow.start_run`` API, so no
global "active run" is left behind in the process. The default store is
``sqlite:///OUT/mlflow.db`` (OUT = the folder that holds the run directories) with the
artifacts in ``OUT/mlartifacts``; look at it with
``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .base import Tracker, TrackerError, epoch_metrics, flatten_config

EXPERIMENT = "cifarlab"
_PARAM_MAX = 6000  # MLflow's limit on a parameter value's length


class MlflowTracker(Tracker):
    name = "mlflow"
    module = "mlflow"

    def start(self, run_dir: Path, config: dict[str, Any], resumed: bool) -> None:
        import logging

        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException

        for name in ("alembic", "mlflow.store.db.utils"):  # creating the SQLite store's tables talks at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        self.run_dir = run_dir
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.parent.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        self._Metric = Metric
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            # A SQLite store's default artifact root is ./mlruns of whatever folder the process runs in.
            location = None if os.environ.get("MLFLOW_TRACKING_URI") else (run_dir.parent.resolve() / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run_id = self._ids().get(self.name) if resumed else None
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise TrackerError(f"mlflow: cannot resume run {run_id}: {e}") from None
                run_id = None  # the store was moved or reset: start a fresh tracker run
        if run_id is None:
            run = self.client.create_run(exp_id, run_name=run_dir.name, tags={"cifarlab.run_dir": str(run_dir)})
            run_id = run.info.run_id
            params = [Param(k, str(v)[:_PARAM_MAX]) for k, v in flatten_config(config).items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
                self.client.log_batch(run_id, params=params[i:i + 100])
            self.client.log_dict(run_id, config, "config.yaml")
            self._save_id(run_id)
        self.run_id = run_id

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._log(epoch_metrics(row), step=int(row["epoch"]))

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self._log(metrics, step=0)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._Metric(k, v, now, step) for k, v in metrics.items()])

    def log_figures(self, paths: list[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), artifact_path="report")

    def log_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
