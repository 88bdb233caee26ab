"""``cifarlab train ... --seeds N``: one config trained with N seeds as a group ``OUT/NAME/seed-K/``.

Seed run K trains with ``train.seed = base + K`` (the config's ``train.seed`` is the base); the
data split seed ``data.seed`` stays the same, so every seed trains on the same training split and is
tested on the same test images: the spread over seeds is that of the training randomness (weight
initialisation, batch order, augmentation, dropout), and paired tests between models stay valid.

Resumable: each seed is an ordinary run, so running the same command again skips seeds that
finished (``summary.json`` covering all epochs), continues an interrupted one from its
``last.pt`` through ``fit(..., resume=True)`` and starts the rest. A larger N adds seeds.
"""

from __future__ import annotations

import copy
import json
import shutil
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
    """"done", "resume" (a checkpoint to continue from) or "new"."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            done = int(json.loads(summary.read_text()).get("epochs", -1)) >= epochs
        except (OSError, ValueError):
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


def train_group(cfg: RunConfig, out_dir: str | Path, name: str, seeds: int, *, overwrite: bool = False,
                evaluate: bool = False, data=None, quiet: bool = False, trackers: Iterable | None = None,
                log: Callable[[str], None] = print, fit_fn: Callable | None = None) -> list[dict[str, Any]]:
    """Train (or finish) seeds 0..seeds-1 of ``cfg`` under ``out_dir/name``; returns the summaries.

    ``evaluate`` scores each finished seed on the test set (``test_logits.npz``) unless it already was.
    ``fit_fn`` defaults to :func:`cifarlab.train.fit` (the public API; a sweep-like claim wrapper may
    stand in for it).
    """
    from ..data import load_data
    from . import fit

    fit_fn = fit_fn or fit
    group_dir = Path(out_dir) / name
    prepare_group(cfg, group_dir, seeds, overwrite)
    summaries = []
    for k in range(seeds):
        run_dir = seed_dir(group_dir, k)
        status = seed_status(run_dir, cfg.train.epochs)
        remaining = seeds - k - 1
        if status == "done":
            log(f"group {group_dir}: seed {k + 1}/{seeds} (train.seed={cfg.train.seed + k}) already done")
            summaries.append(json.loads((run_dir / "summary.json").read_text()))
        else:
            log(f"group {group_dir}: seed {k + 1}/{seeds} (train.seed={cfg.train.seed + k}) "
                f"{'resuming' if status == 'resume' else 'starting'}; {remaining} more after it")
            if data is None:
                data = load_data(cfg.data)  # the same split for every seed: loaded once
            summaries.append(fit_fn(seed_config(cfg, k), group_dir, run_dir.name, data=data,
                                    resume=status == "resume", overwrite=status == "new", quiet=quiet,
                                    trackers=trackers))
        if evaluate:
            evaluate_seed(run_dir, data)
    return summaries


def evaluate_seed(run_dir: Path, data=None) -> None:
    """Score a seed run on the test set once: kept when ``test_logits.npz`` is newer than the best weights."""
    from ..evaluation import evaluate_run

    logits, best = run_dir / "test_logits.npz", run_dir / "best.safetensors"
    if logits.is_file() and (run_dir / "remote.json").is_file():
        return  # trained and scored on another machine of a study (cifarlab.study.final)
    if logits.is_file() and best.is_file() and logits.stat().st_mtime >= best.stat().st_mtime:
        return
    evaluate_run(run_dir, data=data)
