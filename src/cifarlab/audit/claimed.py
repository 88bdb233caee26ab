"""An audit's folds shared by several machines through a storage: ``cifarlab audit ... --storage URL``.

Each fold is one trial of an Optuna study ``audit-<digest>`` in the storage (the digest is of the folds' count,
the config less its machine-local keys, and the data: every image's name and label in each split; so every
machine started with the same command on the same data joins the same study, and the same command on other
data does not), queued once with the parameter ``fold = K``. A machine claims a queued fold on the claim loop that
sweep workers and a study's final seeds claim on (:mod:`cifarlab.sweep.claims`), beats a heartbeat while it
trains it into its own ``OUT/folds/fold-K/`` (an ordinary run of the group runner, as without a storage),
predicts the fold's held-out, validation and test images (and, fold 0, every image's features) and puts
those predictions (``audit.npz``) into the storage before the trial completes. A machine with no fold left to
claim waits for the others; every machine, once all folds are done, writes the folds it did not train from the
storage (``audit.npz`` and ``remote.json``: which host trained it, where its weights are) and goes on to the
ranking, so each one's ``OUT`` holds the whole audit.

The predictions live in a second study, ``audit-<digest>-files`` (one trial per upload), so that the claim
loop's rounds, which read every trial of the first, do not read megabytes of features each time.

A killed machine's fold goes back to the queue once its heartbeat is stale (at once on Ctrl-C / SIGTERM); a
live machine takes it over (from the start: the checkpoint is on the dead machine; the same machine, rerun,
resumes it). Two queue entries for one fold (two machines creating the study at the same moment) are harmless:
of two claims on a fold, the later trial steps aside.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import RunConfig
from ..errors import CifarlabError
from ..io import atomic_write, atomic_write_text
from ..sweep.claims import ClaimingObjective, StopClaiming, claim_loop
from ..sweep.storage import GRACE_FACTOR, open_storage, redact
from ..train.group import GroupRunner, Member, _comparable
from ..train.loop import Interrupted

FOLD = "fold"


class _NotAFold(CifarlabError):
    """A trial Optuna created because the queue was empty by the time this machine asked."""


class _Duplicate(CifarlabError):
    """Another trial holds the same fold."""


def study_name(cfg: RunConfig, folds: int, data) -> str:
    """``audit-<digest>``: alike for every machine started with the same command on the same data (data.path and
    the device may differ)."""
    h = hashlib.sha256(json.dumps({"folds": folds, "config": _comparable(cfg.to_dict())}, sort_keys=True,
                                  default=str).encode())
    for split in ("train", "val", "test"):
        h.update("\n".join(data.paths.get(split) or ()).encode())
        h.update(np.ascontiguousarray(getattr(data, f"{split}_y").numpy(), np.int64).tobytes())
    return f"audit-{h.hexdigest()[:16]}"


def _fold_of(t) -> int | None:
    """The fold a trial holds, or is queued with (a queued trial's parameter is still in ``fixed_params``)."""
    if FOLD in t.params:
        return int(t.params[FOLD])
    fixed = t.system_attrs.get("fixed_params") or {}
    return int(fixed[FOLD]) if FOLD in fixed else None


def _live_folds(study) -> set[int]:
    from optuna.trial import TrialState

    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    return {k for t in study.get_trials(deepcopy=False, states=live) if (k := _fold_of(t)) is not None}


def _queue_missing(study, folds: int) -> int:
    """Queue every fold that has no trial queued, running or finished; returns how many were queued."""
    missing = sorted(set(range(folds)) - _live_folds(study))
    for k in missing:
        study.enqueue_trial({FOLD: k})
    return len(missing)


def _studies(storage, name: str, folds: int):
    import optuna

    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
        _queue_missing(study, folds)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
        if len(_live_folds(study)) < folds:
            time.sleep(1.0)  # the creator may still be queueing; then queue what is missing (a duplicate is harmless)
        _queue_missing(study, folds)
    files = optuna.create_study(study_name=f"{name}-files", storage=storage, load_if_exists=True)
    return study, files


def claimed_folds(cfg: RunConfig, data, members: list[Member], folder: Path, storage_url: str, *,
                  done: Callable[[Path], bool], predict: Callable[[int, Path], dict[str, np.ndarray]],
                  heartbeat: int = 10, poll: float = 5.0, quiet: bool = False, log: Callable[[str], None] = print,
                  fit_fn: Callable | None = None) -> None:
    """Train this machine's share of the folds into ``folder``; return once all are done and every fold's
    ``audit.npz`` is in ``folder`` (trained here, or fetched). ``data``: the audit's data set (its names and
    labels name the study). ``done(run_dir)``: whether a fold's run is
    finished; ``predict(k, run_dir)``: fold k's predictions, written to its ``audit.npz``
    (:func:`cifarlab.audit.folds.fold_done`, :func:`cifarlab.audit.folds.fold_predictions`)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folds = len(members)
    name = study_name(cfg, folds, data)
    study, files = _studies(open_storage(storage_url, heartbeat), name, folds)
    log(f"audit folds: shared through {redact(storage_url)} as study {name}")
    said_waiting = False

    def next_step(all_trials) -> str:
        nonlocal said_waiting
        trials = [t for t in all_trials if _fold_of(t) is not None]
        if len({_fold_of(t) for t in trials if t.state == TrialState.COMPLETE}) >= folds:
            return "done"
        failed = [t for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs]
        if failed:
            t = failed[0]
            raise CifarlabError(f"audit fold {_fold_of(t)} failed (trial {t.number} of study {name}): "
                                f"{t.user_attrs['error']}")
        running = sorted(_fold_of(t) for t in trials if t.state == TrialState.RUNNING)
        # a fold whose retries were used up by dying machines is queued again
        if any(t.state == TrialState.WAITING for t in trials) or (not running and _queue_missing(study, folds)):
            said_waiting = False
            return "claim"
        if running and not said_waiting:
            log(f"audit folds: waiting for fold(s) {', '.join(map(str, running))} on other machines")
            said_waiting = True
        return "wait"

    objective = _FoldObjective(members, folder, study, files, done, predict, quiet, log, fit_fn)
    try:
        claim_loop(study, objective, grace=GRACE_FACTOR * heartbeat, poll=poll, next_step=next_step)
    except StopClaiming as e:
        if isinstance(e.__cause__, Interrupted):
            raise e.__cause__ from None  # fit's Interrupted: its message and exit status
        raise
    fetch_folds(study, files, folder, log)


class _FoldObjective(ClaimingObjective):
    """One claimed trial: the fold it holds, trained here (or resumed), predicted, and its predictions put into
    the storage."""

    def __init__(self, members, folder: Path, study, files, done, predict, quiet: bool, log, fit_fn):
        super().__init__()
        self.members, self.folder, self.done, self.predict = members, folder, done, predict
        self.study, self.files, self.log = study, files, log
        self.runner = GroupRunner(folder, quiet=quiet, fit_fn=fit_fn, log=lambda m: log(f"audit folds: {m}"))

    def may_give_back(self, t) -> bool:
        return _fold_of(t) is not None and super().may_give_back(t)

    def __call__(self, trial) -> float:
        import optuna
        from optuna.trial import TrialState

        self.claim(trial)
        if _fold_of(self.study._storage.get_trial(trial._trial_id)) is None:
            raise _NotAFold("no fold queued")
        k = trial.suggest_int(FOLD, 0, len(self.members) - 1)
        for t in self.study.get_trials(deepcopy=False):
            if t.number != trial.number and _fold_of(t) == k and (
                    t.state == TrialState.COMPLETE or (t.state == TrialState.RUNNING and t.number < trial.number)):
                trial.set_user_attr("duplicate", True)
                raise _Duplicate(f"fold {k} is held by trial {t.number}")
        m = self.members[k]
        run_dir = self.folder / m.name
        self.log(f"audit folds: {m.label} claimed (trial {trial.number})")
        try:
            if (run_dir / "remote.json").is_file():
                shutil.rmtree(run_dir)  # fetched before, from a claim that was later lost: train it here
            if not self.done(run_dir):
                self.runner.run(m)
            z = self.predict(k, run_dir)
        except Interrupted as e:
            # Not a CifarlabError to Optuna, which would take it as the fold's own failure: the fold goes back to
            # the queue; this machine's checkpoint stays.
            self.handled.add(trial.number)
            raise StopClaiming(str(e)) from e
        except CifarlabError as e:
            trial.set_user_attr("error", str(e))
            raise
        buf = io.BytesIO()
        np.savez(buf, **z)
        self.files.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=float(k),
            user_attrs={FOLD: k, "trial": trial.number, "audit.npz": base64.b64encode(buf.getvalue()).decode()}))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        return float(k)


def fetch_folds(study, files, folder: Path, log: Callable[[str], None] = print) -> list[int]:
    """Write each finished fold that another machine trained into ``folder`` from the storage."""
    from optuna.trial import TrialState

    me = socket.gethostname()
    want = {}
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        k = _fold_of(t)
        if k is None or k in want:
            continue
        d = folder / f"fold-{k}"
        if t.user_attrs.get("host") == me and t.user_attrs.get("run_dir") == str(d.resolve()):
            continue  # trained here
        remote = d / "remote.json"
        if remote.is_file() and (d / "audit.npz").is_file() and json.loads(remote.read_text()).get("trial") == t.number:
            continue  # fetched before
        want[k] = t
    if not want:
        return []
    blobs = {(int(f.user_attrs[FOLD]), int(f.user_attrs["trial"])): f.user_attrs["audit.npz"]
             for f in files.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    for k, t in want.items():
        d = folder / f"fold-{k}"
        blob = blobs.get((k, t.number))
        if blob is None:
            raise CifarlabError(f"the storage holds no predictions of audit fold {k} (trial {t.number})")
        if d.exists():
            shutil.rmtree(d)  # a local attempt that another machine finished first
        d.mkdir(parents=True)
        atomic_write(d / "audit.npz", lambda f, b=base64.b64decode(blob): f.write(b))
        atomic_write_text(d / "remote.json", json.dumps(
            {"trial": t.number, "host": t.user_attrs.get("host"), "run_dir": t.user_attrs.get("run_dir"),
             "note": "trained on another machine: its run (weights, metrics) is there"}, indent=2) + "\n")
    log(f"audit folds: fetched fold(s) {', '.join(map(str, sorted(want)))} from the storage")
    return sorted(want)
