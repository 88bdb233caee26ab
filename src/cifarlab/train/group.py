"""``cifarlab train ... --seeds N``: one config trained with N seeds as a group ``OUT/NAME/seed-K/``.

Seed run K trains with ``train.seed = base + K`` (the config's ``train.seed`` is the base); the
data split seed ``data.seed`` stays the same, so every seed trains on the same training split and is
tested on the same test images: the spread over seeds is that of the training randomness (weight
initialisation, batch order, augmentation, dropout), and paired tests between models stay valid.

Resumable: each seed is an ordinary run, so running the same command again skips seeds that
finished (``summary.json`` covering all epochs), continues an interrupted one from its
``last.pt`` through ``fit(..., resume=True)`` and starts the rest. A larger N adds seeds.

:class:`GroupRunner` trains the members of a group, here and for a study's final seeds claimed
through a shared storage (:mod:`cifarlab.study.final`).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..config import RunConfig
from ..errors import CifarlabError, ConfigError
from ..evaluation.groups import GROUP_FILE, members, read_group, seed_dir
from ..io import atomic_write_text

# Keys that may differ between the command that started a group and the one that continues it.
_LOCAL_KEYS = {("train", "device"), ("data", "path")}


def seed_config(cfg: RunConfig, k: int) -> RunConfig:
    c = copy.deepcopy(cfg)
    c.train.seed = cfg.train.seed + k
    return c


def seed_status(run_dir: Path, epochs: int) -> str:
    """"done", "resume" (a checkpoint to continue from) or "new". A finished run is done when it trained
    ``epochs`` epochs, or fewer because it stopped early or its time budget planned fewer."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
            done = int(s.get("epochs", -1)) >= epochs or bool(s.get("stopped_early") or s.get("time_budget_seconds"))
        except (OSError, ValueError, AttributeError):
            done = False
        if done and (run_dir / "best.safetensors").is_file():
            return "done"
    return "resume" if (run_dir / "last.pt").is_file() else "new"


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(d)
    for section, key in _LOCAL_KEYS:
        d.get(section, {}).pop(key, None)
    return d


def prepare_group(cfg: RunConfig, group_dir: Path, seeds: int, overwrite: bool) -> None:
    """Check (or write) ``group.json``: continuing a group with another config is refused."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if group_dir.exists() and not group_dir.is_dir():
        raise CifarlabError(f"group directory {group_dir} exists and is not a folder")
    if (group_dir / "config.yaml").is_file():
        raise CifarlabError(f"{group_dir} is a single run, not a seeds group; choose another --name")
    info = read_group(group_dir)
    if info and not overwrite:
        if _comparable(info.get("config", {})) != _comparable(cfg.to_dict()):
            raise CifarlabError(f"group {group_dir} was started with another config; rerun its own command, "
                                f"choose another --name, or pass --overwrite to start it again")
        seeds = max(seeds, int(info.get("seeds", seeds)))
    elif overwrite and group_dir.is_dir():
        for _, d in members(group_dir):
            shutil.rmtree(d)
    elif not info and group_dir.is_dir() and any(group_dir.iterdir()):
        raise CifarlabError(f"{group_dir} exists and is not a seeds group; choose another --name or --overwrite")
    group_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(group_dir / GROUP_FILE, json.dumps(
        {"kind": "seeds", "seeds": int(seeds), "base_seed": cfg.train.seed, "seed_rule": "train.seed = base + K",
         "data_seed": cfg.data.seed, "config": cfg.to_dict()}, indent=2))


@dataclass(frozen=True)
class Member:
    """One run of a group: its folder under the group, its config, and how log lines name it.

    A seeds group's members differ in ``train.seed`` (:func:`seed_members`); a group of K folds would
    differ in its data section, which the runner loads once for each distinct one.
    """

    name: str
    cfg: RunConfig
    label: str


def seed_members(cfg: RunConfig, seeds: int) -> list[Member]:
    return [Member(seed_dir(Path(), k).name, seed_config(cfg, k),
                   f"seed {k + 1}/{seeds} (train.seed={cfg.train.seed + k})") for k in range(seeds)]


class GroupRunner:
    """Trains the members of one group into ``group_dir``, one at a time, each an ordinary run: a finished
    member is skipped, an interrupted one resumed from its ``last.pt``, the rest started.

    Used by ``train --seeds`` (:func:`train_group`) and by a study's claimed final seeds
    (:mod:`cifarlab.study.final`, one member per claimed trial). ``fit_fn`` defaults to
    :func:`cifarlab.train.fit` (a wrapper may stand in for it: tests stop a member part way).
    """

    def __init__(self, group_dir: str | Path, *, data=None, quiet: bool = False, trackers: Iterable | None = None,
                 log: Callable[[str], None] = print, fit_fn: Callable | None = None):
        self.group_dir = Path(group_dir)
        self.quiet, self.trackers, self.log, self.fit_fn = quiet, trackers, log, fit_fn
        self._data, self._data_for = data, None  # the loaded data set, and the data section it was loaded for

    def run(self, member: Member, *, evaluate: bool = False, note: str = "") -> dict[str, Any]:
        """Train (or finish) one member; returns its summary. ``evaluate`` also scores it on the test set
        (``test_logits.npz``) unless it already was."""
        from . import fit

        run_dir = self.group_dir / member.name
        if (run_dir / "remote.json").is_file():  # fetched from another machine of a study, whose claim was lost
            shutil.rmtree(run_dir)
        status = seed_status(run_dir, member.cfg.train.epochs)
        if status == "done":
            self.log(f"{member.label} already done")
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            self.log(f"{member.label} {'resuming' if status == 'resume' else 'starting'}{note}")
            summary = (self.fit_fn or fit)(member.cfg, self.group_dir, member.name, data=self.data(member.cfg),
                                           resume=status == "resume", overwrite=status == "new", quiet=self.quiet,
                                           trackers=self.trackers)
        if evaluate:
            evaluate_seed(run_dir, self.data(member.cfg, load=False))
        return summary

    def data(self, cfg: RunConfig, load: bool = True):
        """The data set of ``cfg``'s data section (a data set given to the runner serves every member),
        loaded once for all the members that share it; ``None`` when not loaded and ``load`` is false."""
        if self._data is not None and (self._data_for is None or self._data_for == cfg.data):
            return self._data
        if not load:
            return None
        from ..data import load_data

        self._data, self._data_for = load_data(cfg.data), copy.deepcopy(cfg.data)
        return self._data


def train_group(cfg: RunConfig, out_dir: str | Path, name: str, seeds: int, *, overwrite: bool = False,
                evaluate: bool = False, data=None, quiet: bool = False, trackers: Iterable | None = None,
                log: Callable[[str], None] = print, fit_fn: Callable | None = None) -> list[dict[str, Any]]:
    """Train (or finish) seeds 0..seeds-1 of ``cfg`` under ``out_dir/name``; returns the summaries.

    ``evaluate`` scores each finished seed on the test set (``test_logits.npz``) unless it already was.
    ``fit_fn``: see :class:`GroupRunner`.
    """
    group_dir = Path(out_dir) / name
    prepare_group(cfg, group_dir, seeds, overwrite)
    runner = GroupRunner(group_dir, data=data, quiet=quiet, trackers=trackers, fit_fn=fit_fn,
                         log=lambda m: log(f"group {group_dir}: {m}"))
    members = seed_members(cfg, seeds)
    return [runner.run(m, evaluate=evaluate, note=f"; {len(members) - i - 1} more after it")
            for i, m in enumerate(members)]


def evaluate_seed(run_dir: Path, data=None) -> None:
    """Score a seed run on the test set once: kept when ``test_logits.npz`` is newer than the best weights."""
    from ..evaluation import evaluate_run

    logits, best = run_dir / "test_logits.npz", run_dir / "best.safetensors"
    if logits.is_file() and (run_dir / "remote.json").is_file():
        return  # trained and scored on another machine of a study (cifarlab.study.final)
    if logits.is_file() and best.is_file() and logits.stat().st_mtime >= best.stat().st_mtime:
        return
    evaluate_run(run_dir, data=data)
