"""A study's final seeds claimed through a shared storage: ``cifarlab study STUDY.yaml --storage URL``.

Several machines running the same study share its sweeps through the storage (:mod:`cifarlab.sweep`);
this module shares its final training the same way. Each seed of a model's final group is one trial
of an Optuna study ``NAME-MODEL-final`` in that storage, queued once with the parameter ``seed = K``.
A machine claims a queued seed on the claim loop a sweep worker claims trials on
(:mod:`cifarlab.sweep.claims`), beats a heartbeat while it trains it into its own
``final/MODEL/seed-K/``, scores it on the test set and, with the trial, records the run's files
(everything but the weights and checkpoints: ``config.yaml``, ``metrics.csv``, ``summary.json``,
``test_metrics.json``, ``test_logits.npz``) in the storage. A machine with no seed left to claim
waits for the others; then every machine writes the seeds it did not train from the storage into its
own group (with ``remote.json``: which host trained it and where its weights are), so each one's
study report covers all seeds.

A killed machine's seed goes back to the queue once its heartbeat is stale (and on Ctrl-C / SIGTERM at
once); a live machine takes it over (from the start: its checkpoint is on the dead machine; the same
machine, rerun, resumes it from its own checkpoint). Two queue entries for one seed (two machines
queueing at the same moment) are harmless: of two claims on a seed, the later trial steps aside.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
from pathlib import Path
from typing import Callable

from ..config import RunConfig
from ..errors import CifarlabError
from ..evaluation.groups import seed_dir
from ..io import atomic_write, atomic_write_text
from ..sweep.claims import ClaimingObjective, QueuedItems, claim_all, param_of
from ..sweep.storage import GRACE_FACTOR, open_storage
from ..train.group import GroupRunner, prepare_group, seed_members

SEED = "seed"
FILE_PREFIX = "file:"
LOCAL_ONLY = (".pt", ".safetensors", ".tmp")  # weights and checkpoints stay on the machine that trained them


class _NotASeed(CifarlabError):
    """A trial Optuna created because the queue was empty by the time this machine asked."""


class _Duplicate(CifarlabError):
    """Another trial holds the same seed."""


def _seed_of(t) -> int | None:
    """The seed a trial holds, or is queued with."""
    return param_of(t, SEED)


def claimed_group(cfg: RunConfig, group_dir: Path, seeds: int, storage_url: str, name: str, *,
                  heartbeat: int, log: Callable[[str], None] = print, poll: float = 5.0) -> None:
    """Train this machine's share of ``seeds`` seeds of ``cfg`` into ``group_dir``; return once all are done."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepare_group(cfg, group_dir, seeds, overwrite=False)
    items = QueuedItems(SEED, seeds, not_queued=_NotASeed, duplicate=_Duplicate)
    study = items.open_study(open_storage(storage_url, heartbeat), name, "maximize")
    next_step = items.next_step(
        study, failed=lambda k, n: f"final seed {k + 1} of {group_dir} failed (trial {n})",
        waiting=lambda running: f"waiting for seed(s) {', '.join(str(k + 1) for k in running)} on other machines",
        log=log)
    claim_all(study, _SeedObjective(cfg, group_dir, items, study, log), grace=GRACE_FACTOR * heartbeat,
              poll=poll, next_step=next_step)
    fetch_seeds(study, group_dir, log)


class _SeedObjective(ClaimingObjective):
    """One claimed trial: the seed it holds, trained here (or resumed, or only scored) into the group."""

    def __init__(self, cfg: RunConfig, group_dir: Path, items: QueuedItems, study, log: Callable[[str], None]):
        super().__init__()
        self.group_dir, self.items, self.study, self.log = group_dir, items, study, log
        self.members = seed_members(cfg, items.count)
        self.runner = GroupRunner(group_dir, log=log)  # loads the data once, for the first seed it trains

    def may_give_back(self, t) -> bool:
        return self.items.may_give_back(t) and super().may_give_back(t)

    def __call__(self, trial) -> float:
        self.claim(trial)
        k = self.items.take(self.study, trial)
        self.log(f"{self.members[k].label} claimed (trial {trial.number})")
        with self.running(trial):  # stopped: the seed goes back to the queue (not refused for good); failed: kept
            self.runner.run(self.members[k], evaluate=True)
        run_dir = seed_dir(self.group_dir, k)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        for f in sorted(run_dir.iterdir()):
            if f.is_file() and not f.name.endswith(LOCAL_ONLY):
                trial.set_user_attr(FILE_PREFIX + f.name, base64.b64encode(f.read_bytes()).decode())
        return float(json.loads((run_dir / "test_metrics.json").read_text())["test_acc"])


def fetch_seeds(study, group_dir: Path, log: Callable[[str], None] = print) -> list[int]:
    """Write each finished seed that another machine trained into ``group_dir`` from the storage."""
    from optuna.trial import TrialState

    fetched = []
    me = socket.gethostname()
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        k = _seed_of(t)
        if k is None:
            continue
        d = seed_dir(group_dir, k)
        if t.user_attrs.get("host") == me and t.user_attrs.get("run_dir") == str(d.resolve()):
            continue  # trained here
        files = {n[len(FILE_PREFIX):]: v for n, v in t.user_attrs.items() if n.startswith(FILE_PREFIX)}
        if (d / "remote.json").is_file() and json.loads((d / "remote.json").read_text()).get("trial") == t.number:
            continue  # fetched before
        if d.exists():
            shutil.rmtree(d)  # a local attempt that another machine finished first
        d.mkdir(parents=True)
        for fname, b64 in files.items():
            atomic_write(d / fname, lambda f, b=base64.b64decode(b64): f.write(b))
        atomic_write_text(d / "remote.json", json.dumps(
            {"trial": t.number, "host": t.user_attrs.get("host"), "run_dir": t.user_attrs.get("run_dir"),
             "note": "trained on another machine: its weights and checkpoints are there"}, indent=2) + "\n")
        fetched.append(k)
    if fetched:
        log(f"fetched seed(s) {', '.join(str(k + 1) for k in sorted(fetched))} from the storage")
    return fetched
