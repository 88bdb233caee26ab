"""Running a sweep: an Optuna study in an RDB storage, trials that are ordinary training runs,
worker processes that share the study, and a trial budget that holds across all of them.

Storage is SQLite in the sweep directory by default, or any SQLAlchemy URL (``postgresql://``)
so that workers on several machines share one study. Every worker beats a heartbeat into the
storage (Optuna's ``heartbeat_interval``); a worker that dies (kill -9, power loss) leaves a
RUNNING trial whose heartbeat stops, and the next worker to look -- a live one, or the next
``sweep run`` -- marks it FAIL and queues its parameters again (``RetryHeartbeatStaleTrialCallback``).
Ctrl-C / SIGTERM stop a trial after its current step (``cifarlab.train.fit`` checkpoints) and
do the same at once.

The budget counts COMPLETE and PRUNED trials and trials that FAILed from their own error (a
diverged loss, a combination of values the model rejects): each of those is a result that
cost compute. Trials failed by a dead or interrupted worker and trials turned away by the
budget gate do not count; they are re-run. Optuna's ``MaxTrialsCallback`` only stops a worker
after its trial ends, so K workers overshoot by up to K - 1; the gate here is exact instead:
trial numbers are handed out under a row lock on the study (Optuna's ``_create_new_trial``), so
when trial n starts every lower-numbered trial is visible, and trial n runs only if fewer than
``budget`` of those are counted or still running.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import socket
import sqlite3
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import CifarlabError, ConfigError
from .spec import SweepSpec, base_config, load_sweep_file, parse_sweep

DEFAULT_HEARTBEAT = 10  # seconds between heartbeats; a trial is stale after GRACE_FACTOR of them
GRACE_FACTOR = 3  # SQLite writers can wait a few seconds for the lock: leave room before calling a trial dead
MAX_RETRY = 3  # re-runs of a trial whose worker died, before its parameters are given up (they may crash it)


class SweepInterrupted(CifarlabError):
    """Ctrl-C / SIGTERM stopped the sweep; finished trials are kept, running ones are queued again."""

    exit_code = 130


class _OverBudget(CifarlabError):
    """Raised inside a trial that another worker's trial beat to the last place of the budget."""


class _StopWorker(Exception):
    """Raised inside a trial to end the worker (interrupt); not a CifarlabError, so Optuna re-raises it."""


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


# --------------------------------------------------------------------------- states
def counted(t) -> bool:
    """Does a trial use up a place of the budget? (see the module docstring)"""
    from optuna.trial import TrialState

    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        t.state == TrialState.FAIL and "error" in t.user_attrs)


def active(t) -> bool:
    from optuna.trial import TrialState

    return t.state == TrialState.RUNNING and "skipped" not in t.user_attrs


# --------------------------------------------------------------------------- storage
def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def open_storage(url: str, heartbeat: int | None = None):
    """An Optuna ``RDBStorage`` for ``url``, with heartbeats (and re-queueing of dead workers' trials)."""
    import optuna
    import sqlalchemy.exc

    url = _with_driver(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        # WAL lets readers proceed while one worker writes; the timeout makes writers queue instead of failing.
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as con:
            con.execute("PRAGMA journal_mode=WAL")
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True  # a server may drop idle connections during a long trial
    kwargs: dict[str, Any] = {}
    if heartbeat:
        import inspect

        cb_arg = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
                  in inspect.signature(optuna.storages.RDBStorage).parameters else "failed_trial_callback")
        kwargs = {"heartbeat_interval": int(heartbeat), "grace_period": GRACE_FACTOR * int(heartbeat),
                  cb_arg: requeue}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat_interval is marked experimental
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except ImportError:  # Optuna turns the driver's ModuleNotFoundError into an ImportError
        raise CifarlabError(f"storage {_redact(url)} needs its database driver: pip install 'cifarlab[postgres]' "
                            f"for PostgreSQL (psycopg2), or the driver your URL names") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        raise CifarlabError(f"cannot open storage {_redact(url)}: {str(e).strip().splitlines()[0]}") from None


def _with_driver(url: str) -> str:
    """``postgresql://`` with the installed driver: SQLAlchemy 2.1 defaults to psycopg 3, 2.0 to psycopg2,
    and the ``postgres`` extra installs psycopg2."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    for module, dialect in (("psycopg2", "postgresql+psycopg2"), ("psycopg", "postgresql+psycopg")):
        if importlib.util.find_spec(module) is not None:
            return dialect + url[len("postgresql"):]
    return url


def requeue(study, trial) -> None:
    """Queue a failed trial's parameters again, as a fresh trial (history and pruner rungs cleared).

    Optuna's ``RetryHeartbeatStaleTrialCallback`` copies every system attribute, including the
    ``completed_rung_*`` marks of the successive-halving pruner, which would make the retry skip
    rungs; only the grid point and the retry chain are kept here.
    """
    import optuna

    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    t = copy.deepcopy(trial)
    keep = ("grid_id", "search_space", "failed_trial", "retry_history")
    t.system_attrs = {k: v for k, v in t.system_attrs.items() if k in keep}
    t.user_attrs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        retry_cls(max_retry=MAX_RETRY)(study, t)


def make_sampler(spec: SweepSpec, seed: int | None):
    import optuna

    if spec.method == "grid":
        # GridSampler shuffles its grid with its seed and stores only the grid index in each trial: every
        # worker, on every machine and every rerun, must shuffle alike or indices name different points.
        return optuna.samplers.GridSampler({p.name: p.grid() for p in spec.params}, seed=0)
    if spec.method == "bayes":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # W&B's bayes is a Gaussian process; TPE is Optuna's default Bayesian sampler. The constant
            # liar keeps parallel workers from proposing the same point while the first one runs.
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(spec: SweepSpec, base: dict[str, Any]):
    import optuna

    hb = spec.hyperband
    if hb is None:
        return optuna.pruners.NopPruner()
    if hb.max_resource is not None:
        max_resource: int | str = hb.max_resource
    elif "train.epochs" in {p.name for p in spec.params}:
        max_resource = "auto"  # Optuna takes the longest trial it has seen
    else:
        max_resource = spec.trial_config(base, {}).train.epochs
        if max_resource < hb.min_resource:
            raise ConfigError(f"early_terminate min_iter={hb.min_resource} is beyond train.epochs={max_resource}: "
                              f"no trial would reach the first bracket")
    return optuna.pruners.HyperbandPruner(min_resource=hb.min_resource, max_resource=max_resource,
                                          reduction_factor=hb.reduction_factor)


# --------------------------------------------------------------------------- run
def run_sweep(sweep_file: str | Path, *, trials: int | None = None, workers: int = 1, storage: str | None = None,
              study: str | None = None, out: str | Path = "sweeps", config: str | Path | None = None,
              overrides: list[str] | None = None, heartbeat: int = DEFAULT_HEARTBEAT, seed: int | None = None,
              wandb: bool = False, quiet: bool = False, trackers: list[str] | None = None,
              new_study: bool = False) -> dict[str, Any]:
    """Run (or continue) the sweep described by a W&B sweep file; returns a summary of the study.

    ``trials`` is the study's total budget (W&B's ``run_cap``), counted across all workers and
    all invocations: running again with the same budget finishes what an interrupted run left.
    A study is continued only with the same sweep and the same base config; with another base
    it is refused, or with ``new_study`` a new study (``NAME-2``, ``NAME-3``, ...) is started.
    ``trackers``: ``wandb`` (as ``wandb=True``), ``mlflow``, ``tensorboard``, one tracker run per trial.
    """
    import optuna

    from ..trackers import Trackers

    trackers = list(dict.fromkeys(trackers or []))
    wandb = wandb or "wandb" in trackers
    others = tuple(t for t in trackers if t != "wandb")
    Trackers(list(others))  # a missing extra fails here, before anything is written

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if heartbeat < 1:
        raise ConfigError(f"--heartbeat must be >= 1 second, got {heartbeat}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are reported one line each, below
    raw = load_sweep_file(sweep_file)
    base = base_config(raw, sweep_file, config, overrides)
    spec = parse_sweep(raw, base)
    make_pruner(spec, base)  # its own checks, before anything is written
    if wandb:
        wandb_module()
    name = study or spec.name or Path(sweep_file).stem
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"study name {name!r} may only use letters, digits, '.', '_' and '-'")
    if new_study:
        name = _free_study_name(name, spec.raw, out, storage)
    sweep_dir = Path(out) / name
    url = storage or default_storage(sweep_dir)
    budget = trials or spec.run_cap or (spec.grid_size() if spec.method == "grid" else None)  # W&B: the whole grid
    if budget is None and storage is None and not (sweep_dir / "study.db").is_file():
        raise ConfigError("no trial budget: give --trials N or run_cap in the sweep file")  # before creating files
    if budget is not None and budget < 1:
        raise ConfigError(f"--trials must be >= 1, got {budget}")
    store = open_storage(url)

    existing = {s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)}
    st = optuna.load_study(study_name=name, storage=store) if name in existing else None
    if st is not None:
        _check_same_sweep(st.user_attrs.get("sweep"), spec.raw, name)
        budget = budget or st.user_attrs.get("budget")
    if budget is None:
        raise ConfigError("no trial budget: give --trials N or run_cap in the sweep file")
    if spec.method == "grid" and budget > spec.grid_size():
        if not quiet:
            print(f"grid of {spec.grid_size()} points: budget lowered from {budget}")
        budget = spec.grid_size()
    if st is None:
        trials_dir = sweep_dir / "trials"
        if trials_dir.is_dir() and any(trials_dir.iterdir()):
            raise CifarlabError(f"{trials_dir} holds trial runs of a study that storage {_redact(url)} does not have; "
                                f"choose another --study or --out, or remove that directory")
        st = optuna.create_study(study_name=name, storage=store, direction=spec.direction, load_if_exists=True)
        if "sweep" in st.user_attrs:  # another machine created it a moment ago
            _check_same_sweep(st.user_attrs["sweep"], spec.raw, name)
        else:
            st.set_user_attr("sweep", json.loads(json.dumps(spec.raw)))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    st.set_user_attr("budget", int(budget))
    from ..io import atomic_write_text  # late import (torch); `sweep report` reads these files

    atomic_write_text(sweep_dir / "study.json", json.dumps({"study": name, "storage": url}, indent=2) + "\n")
    atomic_write_text(sweep_dir / "sweep.yaml", yaml.safe_dump(spec.raw, sort_keys=False))

    run = Worker(spec=spec, base=base, storage=url, study=name, sweep_dir=str(sweep_dir.resolve()), budget=int(budget),
                 heartbeat=heartbeat, seed=seed, wandb=wandb, trackers=others, threads=worker_threads(workers),
                 quiet=quiet)
    if not quiet:
        print(f"sweep {name}: {spec.method}, {len(spec.params)} parameters, budget {budget} trials, "
              f"{workers} worker(s) x {run.threads} thread(s), storage {_redact(url)}")
    interrupted = _run_workers(run, workers)
    summary = study_summary(optuna.load_study(study_name=name, storage=store), budget)
    summary["sweep_dir"] = str(sweep_dir)
    if not quiet:
        print(format_summary(summary))
    if interrupted:
        raise SweepInterrupted(f"sweep {name} interrupted: {summary['counted']} of {budget} trials done; "
                               f"run the same command again to continue")
    return summary


def worker_threads(workers: int) -> int:
    """Torch threads per worker: the cores shared out, and never above OMP_NUM_THREADS when that is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = max(1, cores // workers)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(omp)) if omp.isdigit() and int(omp) > 0 else threads


def _run_workers(run: Worker, workers: int) -> bool:
    """Run the workers to the end of the budget; True when the sweep was interrupted."""
    if workers == 1:
        import torch

        old = torch.get_num_threads()
        try:
            return work(run) == "interrupted"
        finally:
            torch.set_num_threads(old)
    from ..data.dataset import load_raw

    # Decode (or download) the data once here, so that K workers do not all build the same cache at once.
    load_raw(run.spec.trial_config(run.base, {}).data)
    ctx = multiprocessing.get_context("spawn")  # fork after torch / SQLAlchemy are loaded is unsafe
    procs = [ctx.Process(target=_worker_main, args=(dataclasses.replace(run, index=i, parent=os.getpid()),),
                         name=f"sweep-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()

    def forward(signum, frame):  # the workers run in their own process groups: pass the signal on, once
        for p in procs:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGINT)

    interrupted = False
    old_int, old_term = signal.signal(signal.SIGINT, forward), signal.signal(signal.SIGTERM, forward)
    try:
        for p in procs:
            p.join()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    for i, p in enumerate(procs):
        if p.exitcode == SweepInterrupted.exit_code:
            interrupted = True
        elif p.exitcode and p.exitcode < 0:
            print(f"worker {i} died ({signal.Signals(-p.exitcode).name}); its trial is marked failed and queued again "
                  f"once its heartbeat is {GRACE_FACTOR * run.heartbeat}s old", file=sys.stderr)
        elif p.exitcode:
            print(f"worker {i} exited with status {p.exitcode}", file=sys.stderr)
    if all(p.exitcode not in (0, SweepInterrupted.exit_code) for p in procs):
        raise CifarlabError("every sweep worker failed; see the messages above")
    return interrupted


def _worker_main(run: Worker) -> None:
    """Entry point of a spawned worker process."""
    os.setpgrp()  # Ctrl-C reaches the parent only, which forwards it once (a second one would not checkpoint)
    try:
        status = work(run)
    except CifarlabError as e:
        print(f"cifarlab: worker {run.index}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(SweepInterrupted.exit_code if status == "interrupted" else 0)


# --------------------------------------------------------------------------- worker
def work(run: Worker) -> str:
    """One worker's loop: start trials until the budget is used; returns "done" or "interrupted"."""
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(run.threads)
    store = open_storage(run.storage, run.heartbeat)
    study = optuna.load_study(study_name=run.study, storage=store)
    seed = None if run.seed is None else run.seed + 7919 * run.index + len(study.get_trials(deepcopy=False))
    study = optuna.load_study(study_name=run.study, storage=store, sampler=make_sampler(run.spec, seed),
                              pruner=make_pruner(run.spec, run.base))
    objective = Objective(run, study)
    poll = min(5.0, run.heartbeat)
    with _silence_handled(objective.handled), _sigterm_as_interrupt():
        while True:
            try:
                if run.orphaned():  # `sweep run` was killed (kill -9): its workers stop with it
                    return "interrupted"
                _fail_stale(study, GRACE_FACTOR * run.heartbeat)
                trials = study.get_trials(deepcopy=False)
                done = sum(map(counted, trials))
                if done >= run.budget or target_reached(run.spec, trials):
                    return "done"
                if done + sum(map(active, trials)) >= run.budget:
                    time.sleep(poll)  # the rest of the budget is running elsewhere: wait in case a worker dies
                    continue
                objective.current = None
                study.optimize(objective, n_trials=1, catch=(CifarlabError,), gc_after_trial=False)
                if objective.stop_after_trial:
                    return "interrupted"
            except (KeyboardInterrupt, _StopWorker):
                if objective.current is not None:
                    t = next((t for t in study.get_trials(deepcopy=False) if t.number == objective.current), None)
                    if t is not None and t.state.name == "FAIL" and "error" not in t.user_attrs:
                        requeue(study, t)
                        objective.say(f"trial {t.number} interrupted: queued to run again")
                return "interrupted"


def target_reached(spec: SweepSpec, trials) -> bool:
    if spec.target is None:
        return False
    values = [t.value for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    if spec.goal == "maximize":
        return any(v >= spec.target for v in values)
    return any(v <= spec.target for v in values)


class Objective:
    """One trial: draw the values, train with ``fit``, report the metric each epoch, prune."""

    def __init__(self, run: Worker, study):
        self.run, self.study = run, study
        self.current: int | None = None
        self.stop_after_trial = False  # a stop came as the trial ended: record it, then end the worker
        self.handled: set[int] = set()  # trials whose failure this class reports itself (no Optuna traceback)
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
        self.current = trial.number
        self._gate(trial)
        values = {p.name: p.suggest(trial) for p in spec.params}
        run_dir = Path(run.sweep_dir) / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", f"{self._host}:{run_dir}")
        trial.set_user_attr("worker", f"{self._host}:{os.getpid()}")
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
            raise _StopWorker(str(e)) from None
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
                raise _StopWorker("the sweep run process is gone")
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


def _fail_stale(study, grace: float | None = None) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    if grace is None:
        return
    # A worker stopped (Ctrl-C, SIGTERM, kill -9) between Optuna creating a trial and the objective
    # starting leaves a RUNNING trial that never got a heartbeat, so the check above never fails it and
    # the budget gate waits on it forever. The objective marks its trial ("worker") at once: a trial
    # still unmarked after the grace period is dead. (Clocks of machines sharing a storage must agree
    # to within the grace period.)
    from datetime import datetime

    from optuna.trial import TrialState

    now = datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "worker" in t.user_attrs or t.datetime_start is None or (now - t.datetime_start).total_seconds() < grace:
            continue
        try:
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                requeue(study, study._storage.get_trial(t._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first


@contextlib.contextmanager
def _silence_handled(numbers: set[int]):
    """Drop Optuna's failure warnings (with traceback) for trials whose failure the objective reported."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            msg = record.getMessage()
            return not any(msg.startswith(f"Trial {n} failed") for n in numbers)

    f = _Filter()
    logger = logging.getLogger("optuna.study._optimize")
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Outside ``fit`` (which has its own guard), SIGTERM stops a worker like Ctrl-C does."""
    try:
        old = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# --------------------------------------------------------------------------- summary
def study_summary(study, budget: int | None = None) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    summary: dict[str, Any] = {"study": study.study_name, "budget": budget, "trials": len(trials), "states": states,
                               "counted": sum(map(counted, trials)), "best": None}
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    if complete:
        best = study.best_trial
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params}
    return summary


def format_summary(s: dict[str, Any]) -> str:
    states = ", ".join(f"{n.lower()} {c}" for n, c in sorted(s["states"].items()))
    line = f"study {s['study']}: {s['counted']}/{s['budget']} trials counted ({states})"
    if s["best"]:
        line += f"; best trial {s['best']['number']}: {s['best']['value']:.4f}"
    return line


# Base-config keys that say where a trial runs, not what it trains: they may differ between the machines and
# reruns of one study (each machine's --data names its own copy of the data set).
WHERE_KEYS = frozenset({"data.path", "train.device", "train.num_threads", "train.log_every"})


def _check_same_sweep(stored: dict | None, current: dict, name: str) -> None:
    """Refuse to continue a study with another sweep or another base config: its trials would mix budgets,
    and ``best`` / ``narrow`` rebuild every trial's config from the stored base."""
    if stored is None:
        return
    keys = ("method", "metric", "parameters", "early_terminate")
    a = json.loads(json.dumps({k: stored.get(k) for k in keys}))
    b = json.loads(json.dumps({k: current.get(k) for k in keys}))
    if a != b:
        diff = [k for k in keys if a[k] != b[k]]
        raise ConfigError(f"study {name!r} exists with a different sweep ({', '.join(diff)} differ); "
                          f"give this sweep another --study name, or pass --new-study")
    diff = base_difference((stored.get("cifarlab") or {}).get("config"), (current.get("cifarlab") or {}).get("config"))
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise ConfigError(f"study {name!r} was run with another base config ({shown}): continue it with the "
                          f"same --config, --set and --epochs, or start a new study with --study NAME or --new-study")


def base_difference(stored: dict | None, current: dict | None) -> list[str]:
    """``key: stored -> current`` for every base-config key that differs (WHERE_KEYS aside)."""
    if stored is None or current is None:
        return []
    a, b = _flat(_normalized(stored)), _flat(_normalized(current))
    return [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b))
            if k not in WHERE_KEYS and a.get(k) != b.get(k)]


def _normalized(config: dict) -> dict[str, Any]:
    """The config with today's defaults filled in and renamed keys mapped, so that a study stored by an older
    cifarlab compares equal to the same base today."""
    from ..config import RunConfig

    try:
        return json.loads(json.dumps(RunConfig.from_dict(copy.deepcopy(config)).to_dict()))
    except CifarlabError:  # a key this version no longer has: compare as stored
        return json.loads(json.dumps(config))


def _flat(config: dict) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in config.items() if isinstance(values, dict) for k, v in values.items()}


def _free_study_name(name: str, sweep: dict, out: str | Path, storage: str | None) -> str:
    """``name`` if no study of that name exists or it holds this very sweep and base, else the first free
    ``name-2``, ``name-3``, ... (``--new-study``)."""
    import optuna

    for i in range(1, 1000):
        candidate = name if i == 1 else f"{name}-{i}"
        sweep_dir = Path(out) / candidate
        url = storage or default_storage(sweep_dir)
        if storage is None and not (sweep_dir / "study.db").is_file():
            if not (sweep_dir / "trials").is_dir():
                return candidate
            continue
        store = open_storage(url)
        if candidate not in {s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)}:
            return candidate
        try:
            _check_same_sweep(optuna.load_study(study_name=candidate, storage=store).user_attrs.get("sweep"),
                              sweep, candidate)
            return candidate
        except ConfigError:
            continue
    raise CifarlabError(f"no free study name {name}-N found")


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


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
