"""The worker processes of a sweep: each claims trials from the shared study and trains them until the
budget is used, on the claim loop of :mod:`.claims`.

``sweep run --workers K`` starts K spawned processes, each in its own process group; Ctrl-C / SIGTERM
reach ``sweep run`` only, which passes the stop on to each worker once. A worker stops a trial after
its current step (``cifarlab.train.fit`` checkpoints), queues it again and ends; a worker whose
``sweep run`` is gone (kill -9) stops with it. A worker that dies leaves a RUNNING trial whose
heartbeat stops; the next worker to look fails it and queues it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import sys

from ..errors import CifarlabError
from .claims import Step, StopClaiming, claim_loop, stop_signals
from .objective import Objective, Worker
from .spec import SweepSpec
from .storage import GRACE_FACTOR, active, counted, make_pruner, make_sampler, open_storage


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
    """One worker's loop: claim trials until the budget is used; returns "done" or "interrupted"."""
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(run.threads)
    with stop_signals():  # for the worker's whole life: a spawned worker inherits an ignored SIGINT too
        try:
            study = _open_study(run)
            end = claim_loop(study, Objective(run, study), grace=GRACE_FACTOR * run.heartbeat,
                             poll=min(5.0, run.heartbeat), next_step=lambda trials: _next_step(run, trials))
        except (KeyboardInterrupt, StopClaiming):
            return "interrupted"
    return "done" if end == "done" else "interrupted"


def _open_study(run: Worker):
    import optuna

    store = open_storage(run.storage, run.heartbeat)
    study = optuna.load_study(study_name=run.study, storage=store)
    seed = None if run.seed is None else run.seed + 7919 * run.index + len(study.get_trials(deepcopy=False))
    return optuna.load_study(study_name=run.study, storage=store, sampler=make_sampler(run.spec, seed),
                             pruner=make_pruner(run.spec, run.base))


def _next_step(run: Worker, trials) -> Step:
    if run.orphaned():  # `sweep run` was killed (kill -9): its workers stop with it
        return "stop"
    done = sum(map(counted, trials))
    if done >= run.budget or target_reached(run.spec, trials):
        return "done"
    if done + sum(map(active, trials)) >= run.budget:
        return "wait"  # the rest of the budget is running elsewhere: wait in case a worker dies
    return "claim"


def target_reached(spec: SweepSpec, trials) -> bool:
    if spec.target is None:
        return False
    values = [t.value for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    if spec.goal == "maximize":
        return any(v >= spec.target for v in values)
    return any(v <= spec.target for v in values)

