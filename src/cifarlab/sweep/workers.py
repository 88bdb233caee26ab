"""The worker processes of a sweep: each claims trials from the shared study and trains them until the
budget is used.

``sweep run --workers K`` starts K spawned processes, each in its own process group; Ctrl-C / SIGTERM
reach ``sweep run`` only, which passes the stop on to each worker once. A worker stops a trial after
its current step (``cifarlab.train.fit`` checkpoints), queues it again and ends; a worker whose
``sweep run`` is gone (kill -9) stops with it. A worker that dies leaves a RUNNING trial whose
heartbeat stops; the next worker to look fails it and queues it again (:func:`fail_stale`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import time
import warnings

from ..errors import CifarlabError
from .objective import Objective, Worker, _StopWorker
from .spec import SweepSpec
from .storage import GRACE_FACTOR, active, counted, make_pruner, make_sampler, open_storage, requeue


class SweepInterrupted(CifarlabError):
    """Ctrl-C / SIGTERM stopped the sweep; finished trials are kept, running ones are queued again."""

    exit_code = 130


def worker_threads(workers: int) -> int:
    """Torch threads per worker: the cores shared out, and never above OMP_NUM_THREADS when that is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = max(1, cores // workers)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(omp)) if omp.isdigit() and int(omp) > 0 else threads


def run_workers(run: Worker, workers: int) -> bool:
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
    procs = [ctx.Process(target=worker_main, args=(dataclasses.replace(run, index=i, parent=os.getpid()),),
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


def worker_main(run: Worker) -> None:
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
    with silence_handled(objective.handled), _sigterm_as_interrupt():
        while True:
            try:
                if run.orphaned():  # `sweep run` was killed (kill -9): its workers stop with it
                    return "interrupted"
                fail_stale(study, GRACE_FACTOR * run.heartbeat)
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


def fail_stale(study, grace: float | None = None) -> None:
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
