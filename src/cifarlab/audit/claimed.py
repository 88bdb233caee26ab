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
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import RunConfig
from ..errors import CifarlabError
from ..io import atomic_write, atomic_write_text
from ..sweep.claims import ClaimingObjective, QueuedItems, claim_all, param_of
from ..sweep.storage import GRACE_FACTOR, open_storage, redact
from ..train.group import GroupRunner, Member, _comparable

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
    """The fold a trial holds, or is queued with."""
    return param_of(t, FOLD)


def _fold_items(folds: int) -> QueuedItems:
    return QueuedItems(FOLD, folds, not_queued=_NotAFold, duplicate=_Duplicate)


def _studies(storage, name: str, items: QueuedItems):
    import optuna

    study = items.open_study(storage, name, "minimize")
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

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    items = _fold_items(len(members))
    name = study_name(cfg, items.count, data)
    study, files = _studies(open_storage(storage_url, heartbeat), name, items)
    log(f"audit folds: shared through {redact(storage_url)} as study {name}")
    next_step = items.next_step(
        study, failed=lambda k, n: f"audit fold {k} failed (trial {n} of study {name})",
        waiting=lambda running: f"audit folds: waiting for fold(s) {', '.join(map(str, running))} on other machines",
        log=log)
    objective = _FoldObjective(members, folder, study, files, items, done, predict, quiet, log, fit_fn)
    claim_all(study, objective, grace=GRACE_FACTOR * heartbeat, poll=poll, next_step=next_step)
    fetch_folds(study, files, folder, log)


class _FoldObjective(ClaimingObjective):
    """One claimed trial: the fold it holds, trained here (or resumed), predicted, and its predictions put into
    the storage."""

    def __init__(self, members, folder: Path, study, files, items: QueuedItems, done, predict, quiet: bool, log,
                 fit_fn):
        super().__init__()
        self.members, self.folder, self.done, self.predict = members, folder, done, predict
        self.study, self.files, self.items, self.log = study, files, items, log
        self.runner = GroupRunner(folder, quiet=quiet, fit_fn=fit_fn, log=lambda m: log(f"audit folds: {m}"))

    def may_give_back(self, t) -> bool:
        return self.items.may_give_back(t) and super().may_give_back(t)

    def __call__(self, trial) -> float:
        import optuna
        from optuna.trial import TrialState

        self.claim(trial)
        k = self.items.take(self.study, trial)
        m = self.members[k]
        run_dir = self.folder / m.name
        self.log(f"audit folds: {m.label} claimed (trial {trial.number})")
        with self.running(trial):  # stopped: the fold goes back to the queue; failed: its error is kept
            if (run_dir / "remote.json").is_file():
                shutil.rmtree(run_dir)  # fetched before, from a claim that was later lost: train it here
            if not self.done(run_dir):
                self.runner.run(m)
            z = self.predict(k, run_dir)
        self.files.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=float(k),
            user_attrs={FOLD: k, "trial": trial.number, "audit.npz": base64.b64encode(_npz_bytes(z)).decode()}))
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


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A fold's predictions as the bytes of an .npz, for the storage (in memory: no file is written)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
