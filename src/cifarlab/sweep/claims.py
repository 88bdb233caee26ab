"""The claim loop: a process takes trials of a shared Optuna study one at a time, as other processes (on this
machine or others) do the same, and gives a trial back when it is stopped.

Two things run on it: a sweep's workers (:mod:`.workers`, one trial per hyperparameter draw) and a
study's final seeds (:mod:`cifarlab.study.final`, one queued trial per seed). Claiming is Optuna's
atomic WAITING -> RUNNING step inside ``study.optimize(n_trials=1)``: a queued trial is taken by
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
