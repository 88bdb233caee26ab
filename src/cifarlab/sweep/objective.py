"""One trial of a sweep: the worker's settings, the budget gate, training the trial with ``fit`` (logged to
the experiment trackers of :mod:`cifarlab.trackers`), reporting each epoch to Optuna (and pruning), how
the trial ended (:class:`TrialResult`), and the data cache a worker keeps between trials.

The budget gate is exact: Optuna's ``MaxTrialsCallback`` only stops a worker after its trial ends, so K
workers would overshoot by up to K - 1. Trial numbers are handed out under a row lock on the study
(Optuna's ``_create_new_trial``), so when trial n starts every lower-numbered trial is visible, and
trial n runs only if fewer than ``budget`` of those are counted or still running.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import CifarlabError
from .claims import ClaimingObjective, StopClaiming
from .spec import SweepSpec
from .storage import DEFAULT_HEARTBEAT, active, counted


class _OverBudget(CifarlabError):
    """Raised inside a trial that another worker's trial beat to the last place of the budget."""


@dataclass
class Worker:
    """Everything a worker process needs (picklable for the spawn start method)."""

    spec: SweepSpec
    base: dict[str, Any]
    storage: str
    study: str
    sweep_dir: str
    budget: int
    heartbeat: int = DEFAULT_HEARTBEAT
    seed: int | None = None
    trackers: tuple[str, ...] = ()  # experiment trackers (wandb, mlflow, tensorboard), one tracker run per trial
    threads: int = 1
    index: int = 0
    quiet: bool = False
    parent: int | None = None  # pid of `sweep run` for a spawned worker: it stops when that process is gone

    def orphaned(self) -> bool:
        return self.parent is not None and os.getppid() != self.parent


# The per-epoch columns a trial writes to the storage (user attribute "history"), read back by the report.
HISTORY = ("val_acc", "val_loss", "train_acc", "train_loss", "seconds")


@dataclass
class TrialResult:
    """How one trial ended, as :meth:`Objective.train` returns it (Optuna is told by :meth:`Objective.__call__`).

    ``state``: ``complete``, ``pruned``, ``failed`` (its own error, in ``message``: it counts against the
    budget) or ``interrupted`` (the worker was stopped: the trial is queued again).
    """

    number: int
    metric: str
    state: Literal["complete", "pruned", "failed", "interrupted"] = "failed"
    message: str = ""
    history: dict[str, list[float | None]] = field(default_factory=lambda: {k: [] for k in HISTORY})
    seconds: float = 0.0
    stop_worker: bool = False  # a stop came as the trial ended: it keeps its result, then the worker ends

    @property
    def value(self) -> float | None:
        """The metric's last measured value."""
        return next((v for v in reversed(self.history[self.metric]) if v is not None), None)

    def last(self) -> str:
        v = self.value
        return f"{self.metric} {v:.4f}" if v is not None else f"no {self.metric}"


class Objective(ClaimingObjective):
    """One trial: draw the values, train with ``fit``, report the metric each epoch, prune."""

    def __init__(self, run: Worker, study):
        super().__init__()
        self.run, self.study = run, study
        self._data: dict[str, Any] = {}
        self._host = socket.gethostname()

    def say(self, msg: str) -> None:
        if not self.run.quiet:
            print(f"[worker {self.run.index}] {msg}", flush=True)

    def __call__(self, trial) -> float:
        """Optuna's side of a trial: a complete trial's value; a pruned one raises ``TrialPruned``, a failed one
        a CifarlabError (Optuna records FAIL and goes on), an interrupted one :class:`StopClaiming`."""
        import optuna

        self.claim(trial)
        self._gate(trial)
        r = self.train(trial)
        self.stop_after_trial = r.stop_worker
        if r.state == "complete":
            self.say(f"trial {r.number} complete: {r.metric} {r.value:.4f} "
                     f"({len(r.history['val_acc'])} epochs, {r.seconds:.1f}s)")
            return r.value
        if r.state == "pruned":
            end = "; stopping" if r.stop_worker else f" {r.seconds:.1f}s"
            self.say(f"trial {r.number} {r.message} ({r.last()}){end}")
            raise optuna.TrialPruned(r.message)
        self.handled.add(r.number)  # reported here: no Optuna traceback
        if r.state == "failed":
            trial.set_user_attr("error", r.message)
            self.say(f"trial {r.number} failed: {r.message}")
            raise CifarlabError(f"trial {r.number}: {r.message}")
        trial.set_user_attr("interrupted", r.message)
        raise StopClaiming(r.message)

    def given_back(self, t) -> None:
        self.say(f"trial {t.number} interrupted: queued to run again")

    def train(self, trial) -> TrialResult:
        """Train the trial's draw of values as a run of its own, logged to the worker's trackers."""
        from ..trackers import Trackers

        run = self.run
        values = {p.name: p.suggest(trial) for p in run.spec.params}
        run_dir = Path(run.sweep_dir) / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", f"{self._host}:{run_dir}")
        r = TrialResult(trial.number, run.spec.metric)
        t0 = time.perf_counter()
        trackers = Trackers(list(run.trackers), self._tracker_options(values))
        try:
            self._fit(trial, values, run_dir, trackers, r)
        finally:
            # Sweeps never resume a trial (a retry starts over), and each checkpoint weighs several times
            # the weights: keep best.safetensors, drop last.pt.
            (run_dir / "last.pt").unlink(missing_ok=True)
            (run_dir / "last.prev.pt").unlink(missing_ok=True)
            trackers.finish(failed=r.state not in ("complete", "pruned"), tags={"trial_state": r.state})
        r.seconds = time.perf_counter() - t0
        return r

    def _fit(self, trial, values: dict[str, Any], run_dir: Path, trackers, r: TrialResult) -> None:
        import optuna

        from ..train import fit
        from ..train.loop import Interrupted

        try:
            cfg = self.run.spec.trial_config(self.run.base, values)
            fit(cfg, run_dir.parent, run_dir.name, data=self._load(cfg), quiet=True, overwrite=True,
                on_epoch_end=self._reporter(trial, cfg, r), trackers=trackers)
            r.state = "complete"
        except optuna.TrialPruned as e:
            r.state, r.message = "pruned", str(e)
        except Interrupted as e:  # fit's "resume with" hint does not apply: the trial is queued to run again
            r.state, r.message = "interrupted", str(e).split(";")[0]
        except StopClaiming as e:
            r.state, r.message = "interrupted", str(e)
        except KeyboardInterrupt as e:
            # A stop that came after the trial's last step reaches here once fit has written the finished run
            # (summary.json), or as the trial was being pruned: the trial keeps its result, and the worker
            # stops once Optuna has recorded it. Any other stop leaves the trial to be queued again.
            if isinstance(e.__context__, optuna.TrialPruned):
                r.state, r.message, r.stop_worker = "pruned", str(e.__context__), True
            elif (run_dir / "summary.json").is_file():
                r.state, r.stop_worker = "complete", True
            else:
                r.state, r.message = "interrupted", "KeyboardInterrupt"
        except CifarlabError as e:
            r.state, r.message = "failed", str(e)
        if r.state == "complete" and (r.value is None or not math.isfinite(r.value)):
            r.state, r.message = "failed", f"{r.metric} was never measured or not finite: {r.value}"

    def _tracker_options(self, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """W&B: one offline run per trial under the sweep directory, grouped by study (``wandb sync`` uploads it
        later; ``WANDB_MODE`` still wins), with the trial's drawn values in its config."""
        run = self.run
        return {"wandb": {"project": run.spec.name or run.study, "group": run.study, "job_type": "sweep-trial",
                          "mode": os.environ.get("WANDB_MODE") or "offline", "dir": run.sweep_dir,
                          "config": {"sweep_params": values}}}

    def _gate(self, trial) -> None:
        """Turn the trial away when the trials numbered before it already fill the budget (module docstring)."""
        ahead = sum(1 for t in self.study.get_trials(deepcopy=False)
                    if t.number < trial.number and (counted(t) or active(t)))
        if ahead >= self.run.budget:
            trial.set_user_attr("skipped", "the budget was already taken by other workers' trials")
            self.handled.add(trial.number)
            raise _OverBudget(f"trial {trial.number} not run: budget of {self.run.budget} reached")

    def _reporter(self, trial, cfg, r: TrialResult):
        """The ``on_epoch_end`` of a trial: record the epoch in the storage, report the metric, maybe prune.
        ``cfg`` is the trial's config as ``fit`` trains it: a time budget's plan sets its epochs inside ``fit``."""
        import optuna

        run, metric = self.run, self.run.spec.metric

        def on_epoch_end(epoch: int, row: dict) -> None:
            for k in r.history:
                r.history[k].append(None if row.get(k, "") == "" else float(row[k]))
            trial.set_user_attr("history", r.history)  # the report reads curves from the storage, on any machine
            if run.orphaned():
                raise StopClaiming("the sweep run process is gone")
            value = row.get(metric, "")
            if value == "" or not math.isfinite(float(value)):
                return
            trial.report(float(value), epoch)
            epochs = cfg.train.epochs
            if epoch < epochs and trial.should_prune():  # a trial at its last epoch has cost all it will
                raise optuna.TrialPruned(f"pruned after epoch {epoch}/{epochs}")

        return on_epoch_end

    def _load(self, cfg):
        """The data set, loaded once per worker for each distinct split (trials mostly share one)."""
        from ..data import load_data

        key = data_key(cfg.data)
        if key not in self._data:
            self._data.clear()
            self._data[key] = load_data(cfg.data)
        return self._data[key]


# Data-section keys that act on training batches only (data/augment.py, train/mix.py): trials that differ in
# them share one loaded data set. Every other key, including any added later, is part of the cache key.
BATCH_ONLY_KEYS = frozenset({"augment_p", "augment_flip", "rotation", "crop_scale", "crop_ratio", "flip", "translate",
                             "cutout", "mixup", "cutmix", "trivial_augment", "progressive_size", "progressive_until"})


def data_key(d) -> str:
    """What the loaded data of a trial depends on: the whole data section but its batch-time keys, and
    $CIFARLAB_DATA (the source when data.path is unset)."""
    fields = {k: v for k, v in dataclasses.asdict(d).items() if k not in BATCH_ONLY_KEYS}
    return json.dumps({"data": fields, "CIFARLAB_DATA": os.environ.get("CIFARLAB_DATA")}, sort_keys=True,
                      default=str)
