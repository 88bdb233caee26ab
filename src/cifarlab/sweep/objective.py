"""One trial of a sweep: the worker's settings, the budget gate, training the trial with ``fit``, reporting
each epoch to Optuna (and pruning), and the data cache a worker keeps between trials.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    wandb: bool = False
    trackers: tuple[str, ...] = ()  # other experiment trackers (mlflow, tensorboard), one tracker run per trial
    threads: int = 1
    index: int = 0
    quiet: bool = False
    parent: int | None = None  # pid of `sweep run` for a spawned worker: it stops when that process is gone

    def orphaned(self) -> bool:
        return self.parent is not None and os.getppid() != self.parent


class Objective(ClaimingObjective):
    """One trial: draw the values, train with ``fit``, report the metric each epoch, prune."""

    def __init__(self, run: Worker, study):
        super().__init__()
        self.run, self.study = run, study
        self._data: dict[tuple, Any] = {}
        self._host = socket.gethostname()

    def say(self, msg: str) -> None:
        if not self.run.quiet:
            print(f"[worker {self.run.index}] {msg}", flush=True)

    def __call__(self, trial) -> float:
        import optuna

        from ..trackers import Trackers
        from ..train import fit
        from ..train.loop import Interrupted

        run, spec = self.run, self.run.spec
        self.claim(trial)
        self._gate(trial)
        values = {p.name: p.suggest(trial) for p in spec.params}
        run_dir = Path(run.sweep_dir) / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", f"{self._host}:{run_dir}")
        hist: dict[str, list] = {"val_acc": [], "val_loss": [], "train_acc": [], "train_loss": [], "seconds": []}
        logger = WandbTrial(run, trial.number, values) if run.wandb else None
        t0 = time.perf_counter()
        try:
            cfg = spec.trial_config(run.base, values)
            if logger:
                logger.start(cfg)
            with Trackers(list(run.trackers)) as trackers:
                fit(cfg, run_dir.parent, run_dir.name, data=self._load(cfg), quiet=True, overwrite=True,
                    on_epoch_end=self._reporter(trial, cfg.train.epochs, hist, logger), trackers=trackers)
        except optuna.TrialPruned as e:
            self.say(f"trial {trial.number} {e} ({_last(hist, spec.metric)}) {time.perf_counter() - t0:.1f}s")
            self._end(logger, "pruned")
            raise
        except Interrupted as e:  # fit's "resume with" hint does not apply: the trial is queued to run again
            self._end(logger, "interrupted", trial, "interrupted", str(e).split(";")[0])
            raise StopClaiming(str(e)) from None
        except KeyboardInterrupt as e:
            # A stop that came after the trial's last step reaches here once fit has written the finished run
            # (summary.json), or as the trial was being pruned: the trial keeps its result, and the worker
            # stops once Optuna has recorded it. Any other stop leaves the trial to be queued again.
            pruned = e.__context__ if isinstance(e.__context__, optuna.TrialPruned) else None
            if pruned is None and not (run_dir / "summary.json").is_file():
                self._end(logger, "interrupted", trial, "interrupted", "KeyboardInterrupt")
                raise
            self.stop_after_trial = True
            if pruned is not None:
                self.say(f"trial {trial.number} {pruned} ({_last(hist, spec.metric)}); stopping")
                self._end(logger, "pruned")
                raise pruned from None
        except CifarlabError as e:
            self.say(f"trial {trial.number} failed: {e}")
            self._end(logger, "failed", trial, "error", str(e))
            raise
        finally:
            # Sweeps never resume a trial (a retry starts over), and each checkpoint weighs several times
            # the weights: keep best.safetensors, drop last.pt.
            (run_dir / "last.pt").unlink(missing_ok=True)
            (run_dir / "last.prev.pt").unlink(missing_ok=True)
        value = next((v for v in reversed(hist[spec.metric]) if v is not None), None)
        if value is None or not math.isfinite(value):
            self._end(logger, "failed", trial, "error", f"{spec.metric} was never measured or not finite: {value}")
            raise CifarlabError(f"trial {trial.number}: {spec.metric} = {value}")
        self._end(logger, "complete")
        self.say(f"trial {trial.number} complete: {spec.metric} {value:.4f} "
                 f"({len(hist['val_acc'])} epochs, {time.perf_counter() - t0:.1f}s)")
        return value

    def given_back(self, t) -> None:
        self.say(f"trial {t.number} interrupted: queued to run again")

    def _gate(self, trial) -> None:
        """Turn the trial away when the trials numbered before it already fill the budget (module docstring)."""
        ahead = sum(1 for t in self.study.get_trials(deepcopy=False)
                    if t.number < trial.number and (counted(t) or active(t)))
        if ahead >= self.run.budget:
            trial.set_user_attr("skipped", "the budget was already taken by other workers' trials")
            self.handled.add(trial.number)
            raise _OverBudget(f"trial {trial.number} not run: budget of {self.run.budget} reached")

    def _reporter(self, trial, epochs: int, hist: dict, logger):
        """The ``on_epoch_end`` of a trial: record the epoch in the storage, report the metric, maybe prune."""
        import optuna

        run, metric = self.run, self.run.spec.metric

        def on_epoch_end(epoch: int, row: dict) -> None:
            for k in hist:
                hist[k].append(None if row.get(k, "") == "" else float(row[k]))
            trial.set_user_attr("history", hist)  # the report reads curves from the storage, on any machine
            if logger:
                logger.log(row)
            if run.orphaned():
                self._end(logger, "interrupted", trial, "interrupted", "the sweep run process is gone")
                raise StopClaiming("the sweep run process is gone")
            value = row.get(metric, "")
            if value == "" or not math.isfinite(float(value)):
                return
            trial.report(float(value), epoch)
            if epoch < epochs and trial.should_prune():  # a trial at its last epoch has cost all it will
                raise optuna.TrialPruned(f"pruned after epoch {epoch}/{epochs}")

        return on_epoch_end

    def _end(self, logger, state: str, trial=None, attr: str | None = None, message: str = "") -> None:
        if trial is not None and attr is not None:
            trial.set_user_attr(attr, message)
            self.handled.add(trial.number)
        if logger:
            logger.finish(state)

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


def _last(hist: dict, metric: str) -> str:
    v = next((v for v in reversed(hist[metric]) if v is not None), None)
    return f"{metric} {v:.4f}" if v is not None else f"no {metric}"


# --------------------------------------------------------------------------- W&B
def wandb_module():
    try:
        import wandb
    except ImportError:
        raise CifarlabError("--wandb needs the wandb package: pip install 'cifarlab[wandb]'") from None
    return wandb


class WandbTrial:
    """A trial logged as a W&B run in offline mode (``wandb sync`` uploads it later)."""

    def __init__(self, run: Worker, number: int, values: dict[str, Any]):
        self.wandb = wandb_module()
        self.run, self.number, self.values = run, number, values
        self.w = None

    def start(self, cfg) -> None:
        self.w = self.wandb.init(project=self.run.spec.name or self.run.study, group=self.run.study,
                                 name=f"trial-{self.number:04d}", job_type="sweep-trial", mode="offline",
                                 dir=self.run.sweep_dir, config={**cfg.to_dict(), "sweep_params": self.values})

    def log(self, row: dict) -> None:
        if self.w is not None:
            self.w.log({k: v for k, v in row.items() if v != "" and k != "epoch"}, step=int(row["epoch"]))

    def finish(self, state: str) -> None:
        if self.w is not None:
            self.w.summary["trial_state"] = state
            self.w.finish(exit_code=0 if state in ("complete", "pruned") else 1)
            self.w = None
