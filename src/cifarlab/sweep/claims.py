"""The claim loop: a process takes trials of a shared Optuna study one at a time, as other processes (on this
machine or others) do the same, and gives a trial back when it is stopped.

Three things run on it: a sweep's workers (:mod:`.workers`, one trial per hyperparameter draw), a
study's final seeds (:mod:`cifarlab.study.final`) and an audit's folds (:mod:`cifarlab.audit.claimed`),
the last two as :class:`QueuedItems` (one queued trial per seed or fold, claimed with :func:`claim_all`).
Claiming is Optuna's atomic WAITING -> RUNNING step inside ``study.optimize(n_trials=1)``: a queued trial is taken by
exactly one process, and with none queued the sampler draws a new one. A process beats a heartbeat
into the storage while it holds a trial (:func:`cifarlab.sweep.storage.open_storage`); a process
that dies leaves a RUNNING trial whose heartbeat stops, and the next one to look fails it and
queues it again (:func:`fail_stale`). A process that is stopped (Ctrl-C, SIGTERM, or the objective
raising :class:`StopClaiming`) gives its trial back at once: it is queued again for another process,
or for this one run again. While it claims, Ctrl-C and SIGTERM raise KeyboardInterrupt whatever the
process inherited (:func:`stop_signals`), so no stop is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
import warnings
from typing import Callable, Literal

from ..errors import CifarlabError
from .storage import requeue

Step = Literal["claim", "wait", "done", "stop"]


class StopClaiming(Exception):
    """Raised inside a trial to stop the claim loop and give the trial back. Not a CifarlabError: Optuna
    catches those as the trial's own failure (the loop passes ``catch=(CifarlabError,)``) and goes on."""


class ClaimingObjective:
    """What the claim loop needs of an objective, besides being called with each claimed trial.

    ``claim`` marks the trial as held by this process first thing (a RUNNING trial that is not marked
    after the grace period was lost before its objective started: :func:`fail_stale`). A trial's own
    failure sets its ``error`` attribute: such a trial is not given back, its failure is its result.
    """

    def __init__(self) -> None:
        self.current: int | None = None  # the number of the trial this process holds
        self.handled: set[int] = set()  # trials whose failure the objective reported itself (no Optuna traceback)
        self.stop_after_trial = False  # a stop came as the trial ended: the trial keeps its result, the loop ends

    def claim(self, trial) -> None:
        self.current = trial.number
        trial.set_user_attr("worker", worker_id())

    def may_give_back(self, t) -> bool:
        """Whether a trial that failed as this process was stopped is queued again."""
        return "error" not in t.user_attrs

    def given_back(self, t) -> None:
        """Called once a stopped trial is queued again."""

    @contextlib.contextmanager
    def running(self, trial):
        """The claimed trial's work (a run of the group runner): a run stopped by Ctrl-C / SIGTERM
        (:class:`~cifarlab.train.state.Interrupted`) raises :class:`StopClaiming`, so that the trial goes back to
        the queue (to Optuna a CifarlabError would be the trial's own failure; this machine's checkpoint stays);
        any other CifarlabError is the trial's own failure, kept in its ``error`` attribute."""
        from ..train.state import Interrupted  # here: it imports torch

        try:
            yield
        except Interrupted as e:
            self.handled.add(trial.number)
            raise StopClaiming(str(e)) from e
        except CifarlabError as e:
            trial.set_user_attr("error", str(e))
            raise


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_loop(study, objective: ClaimingObjective, *, grace: float, poll: float,
               next_step: Callable[[list], Step]) -> Step:
    """Claim and run trials of ``study`` with ``objective`` until ``next_step`` ends the loop.

    Each round fails the trials of dead processes (:func:`fail_stale`, after ``grace`` seconds) and
    asks ``next_step(trials)`` what to do: ``claim`` runs one trial, ``wait`` sleeps ``poll`` seconds
    (the rest of the work is held elsewhere: wait in case a process dies), ``done`` and ``stop`` end
    the loop and are returned. A stop that the objective took as its trial ended (its result kept)
    returns ``stop``. Any other stop (Ctrl-C, SIGTERM, :class:`StopClaiming`) gives the trial back
    and is raised on.
    """
    with silence_handled(objective.handled), stop_signals():
        while True:
            fail_stale(study, grace)
            step = next_step(study.get_trials(deepcopy=False))
            if step in ("done", "stop"):
                return step
            if step == "wait":
                time.sleep(poll)
                continue
            objective.current = None
            try:
                study.optimize(objective, n_trials=1, catch=(CifarlabError,), gc_after_trial=False)
            except (KeyboardInterrupt, StopClaiming):
                give_back(study, objective)
                raise
            if objective.stop_after_trial:
                return "stop"


def claim_all(study, objective: ClaimingObjective, *, grace: float, poll: float,
              next_step: Callable[[list], Step]) -> Step:
    """:func:`claim_loop`, with a stop that came from a run's :class:`~cifarlab.train.state.Interrupted` (the
    objective raised :class:`StopClaiming` from it) raised as that Interrupted: its message and exit status."""
    from ..train.state import Interrupted  # here: it imports torch

    try:
        return claim_loop(study, objective, grace=grace, poll=poll, next_step=next_step)
    except StopClaiming as e:
        if isinstance(e.__cause__, Interrupted):
            raise e.__cause__ from None
        raise


def param_of(t, name: str) -> int | None:
    """A trial's int parameter ``name``: the one it holds, or is queued with (a queued trial's parameter is
    still in ``fixed_params``); None for a trial without it."""
    if name in t.params:
        return int(t.params[name])
    fixed = t.system_attrs.get("fixed_params") or {}
    return int(fixed[name]) if name in fixed else None


class QueuedItems:
    """``count`` indexed items (a study's final seeds, an audit's folds) shared by processes through one study:
    each item is a trial queued with the fixed int parameter ``name = K`` (K in 0..count-1), taken by one
    process on :func:`claim_loop`. An item whose trial was lost (an error, a dead process's retries used up,
    never queued) is queued again; two queue entries for one item (two processes queueing at the same moment)
    are harmless: of two claims on an item, the later trial steps aside (:meth:`take`).

    ``not_queued`` and ``duplicate`` are the caller's CifarlabError subclasses for a trial Optuna created
    because the queue was empty by the time the process asked, and for a trial whose item another holds."""

    def __init__(self, name: str, count: int, *, not_queued: type[CifarlabError], duplicate: type[CifarlabError]):
        self.name, self.count = name, count
        self.not_queued, self.duplicate = not_queued, duplicate

    def of(self, t) -> int | None:
        return param_of(t, self.name)

    def live(self, study) -> set[int]:
        """The items with a trial queued, running or finished."""
        from optuna.trial import TrialState

        live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
        return {k for t in study.get_trials(deepcopy=False, states=live) if (k := self.of(t)) is not None}

    def queue_missing(self, study) -> int:
        """Queue every item that has no trial queued, running or finished; returns how many were queued."""
        missing = sorted(set(range(self.count)) - self.live(study))
        for k in missing:
            study.enqueue_trial({self.name: k})
        return len(missing)

    def open_study(self, storage, study_name: str, direction: str):
        """The study ``study_name`` in ``storage``, created (by the first process) or loaded, with every item
        queued."""
        import optuna

        try:
            study = optuna.create_study(study_name=study_name, storage=storage, direction=direction)
            self.queue_missing(study)
            return study
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=study_name, storage=storage)
        if len(self.live(study)) < self.count:
            time.sleep(1.0)  # the creator may still be queueing; then queue what is missing (a duplicate is harmless)
        self.queue_missing(study)
        return study

    def next_step(self, study, *, failed: Callable[[int, int], str], waiting: Callable[[list[int]], str],
                  log: Callable[[str], None]) -> Callable[[list], Step]:
        """The ``next_step`` of :func:`claim_loop` for these items: ``done`` once every item has a finished trial,
        ``claim`` while one is queued, else ``wait`` (logging ``waiting(running items)`` once per wait). A trial
        that failed of its own (its ``error`` attribute) raises CifarlabError ``failed(item, trial number)``
        followed by the error."""
        from optuna.trial import TrialState

        said_waiting = False

        def step(all_trials) -> Step:
            nonlocal said_waiting
            trials = [t for t in all_trials if self.of(t) is not None]
            if len({self.of(t) for t in trials if t.state == TrialState.COMPLETE}) >= self.count:
                return "done"
            bad = [t for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs]
            if bad:
                t = bad[0]
                raise CifarlabError(f"{failed(self.of(t), t.number)}: {t.user_attrs['error']}")
            running = sorted(self.of(t) for t in trials if t.state == TrialState.RUNNING)
            # an item whose retries were used up by dying processes is queued again
            if any(t.state == TrialState.WAITING for t in trials) or (not running and self.queue_missing(study)):
                said_waiting = False
                return "claim"
            if running and not said_waiting:
                log(waiting(running))
                said_waiting = True
            return "wait"

        return step

    def take(self, study, trial) -> int:
        """The item a claimed trial holds (its parameter suggested into the trial); raises ``not_queued`` for a
        trial that was not queued, ``duplicate`` (the trial marked so) when an earlier or finished trial holds
        the same item."""
        from optuna.trial import TrialState

        if self.of(study._storage.get_trial(trial._trial_id)) is None:
            raise self.not_queued(f"no {self.name} queued")
        k = trial.suggest_int(self.name, 0, self.count - 1)
        for t in study.get_trials(deepcopy=False):
            if t.number != trial.number and self.of(t) == k and (
                    t.state == TrialState.COMPLETE or (t.state == TrialState.RUNNING and t.number < trial.number)):
                trial.set_user_attr("duplicate", True)
                raise self.duplicate(f"{self.name} {k} is held by trial {t.number}")
        return k

    def may_give_back(self, t) -> bool:
        """Only a trial that held an item goes back to the queue (not one Optuna drew with the queue empty)."""
        return self.of(t) is not None


def give_back(study, objective: ClaimingObjective) -> None:
    """Queue the trial the objective held again, when it failed as the process was stopped."""
    if objective.current is None:
        return
    t = next((t for t in study.get_trials(deepcopy=False) if t.number == objective.current), None)
    if t is not None and t.state.name == "FAIL" and objective.may_give_back(t):
        requeue(study, t)
        objective.given_back(t)


def fail_stale(study, grace: float | None = None) -> None:
    """Fail the RUNNING trials of dead processes and queue them again."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    if grace is None:
        return
    # A process stopped (Ctrl-C, SIGTERM, kill -9) between Optuna creating a trial and the objective
    # starting leaves a RUNNING trial that never got a heartbeat, so the check above never fails it and
    # a sweep's budget gate waits on it forever. The objective marks its trial ("worker") at once: a trial
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
            pass  # another process got there first


@contextlib.contextmanager
def silence_handled(numbers: set[int]):
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
def stop_signals():
    """SIGINT and SIGTERM raise KeyboardInterrupt for as long as the block runs, whatever handlers the process
    started with: a script's background job starts with SIGINT ignored, and ``fit``, which hands a stop that
    came after a trial's last step back to the handler from before it, would hand it to "ignore" (the trial
    would be kept and the next one started). Inside ``fit`` its own guard still takes them first."""
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            old[s] = signal.signal(s, signal.default_int_handler)
        except ValueError:  # not the main thread: signals go to the main thread anyway
            break
    try:
        yield
    finally:
        for s, h in old.items():
            if h is not None:  # None: a handler installed outside Python, which cannot be put back from here
                signal.signal(s, h)
