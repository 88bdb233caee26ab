"""Weights & Biases: offline unless the user has configured an online login.

``WANDB_MODE`` always wins. Without it, the run is online only when W&B credentials
are configured (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE`` or a ``.netrc``
entry for the W&B host, as ``wandb login`` writes); otherwise it is offline and
``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later. The run's files live
in ``RUN_DIR/wandb``.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from .base import Tracker, TrackerError, epoch_metrics

PROJECT = "cifarlab"


def wandb_mode(environ: Mapping[str, str] | None = None) -> str:
    """``WANDB_MODE`` if set, else ``online`` when credentials are configured, else ``offline``."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    host = urlsplit(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = env.get("NETRC") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".netrc")
    try:
        found = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        found = None
    return "online" if found and found[2] else "offline"


class WandbTracker(Tracker):
    """One W&B run per training run. The options replace the defaults where given: a sweep logs each trial
    offline under the sweep directory (``dir``), grouped by study (``project``, ``group``, ``job_type``),
    with the trial's drawn values added to its config (``config``)."""

    name = "wandb"
    module = "wandb"

    def __init__(self, *, project: str | None = None, group: str | None = None, job_type: str | None = None,
                 mode: str | None = None, dir: str | Path | None = None, config: dict[str, Any] | None = None):
        super().__init__()
        self.project, self.group, self.job_type, self.mode, self.dir = project, group, job_type, mode, dir
        self.extra_config = dict(config or {})

    def start(self, run_dir: Path, config: dict[str, Any], resumed: bool) -> None:
        import wandb

        self.run_dir = run_dir
        run_id = self._ids().get(self.name) if resumed else None
        try:
            self.run = wandb.init(
                project=self.project or os.environ.get("WANDB_PROJECT") or PROJECT, group=self.group,
                job_type=self.job_type, name=run_dir.name, dir=str(self.dir or run_dir),
                config={**config, **self.extra_config}, mode=self.mode or wandb_mode(), id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(console="off", quiet=True))  # keep stdout to cifarlab's own progress lines
        except Exception as e:  # wandb raises its own errors for a bad login, network, mode ...
            raise TrackerError(f"wandb could not start: {e}") from None
        # Every metric is plotted against the epoch, also after a resume.
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        if run_id is None:
            self._save_id(self.run.id)

    def log_epoch(self, row: dict[str, Any]) -> None:
        self.run.log({"epoch": int(row["epoch"]), **epoch_metrics(row)})

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def log_figures(self, paths: list[Path]) -> None:
        import wandb

        self.run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in paths})

    def log_tags(self, tags: dict[str, str]) -> None:
        self.run.summary.update(tags)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
