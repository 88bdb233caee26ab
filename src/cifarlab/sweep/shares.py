"""Shares of a total time budget: ``sweep run --time 2h`` and ``study --time 6h`` (issue #29).

A total is wall-clock time. Trials run ``workers`` at a time, so a sweep of ``n`` trials takes
``ceil(n / workers)`` rounds, and each trial gets ``train.time_budget = total / ceil(n / workers)``: one
worker gives ``total / n``; four workers give each trial four times that, because four trials run at once
(each worker has its share of the cores, and each trial's plan times its steps with the threads it has).
Shares are floored to the millisecond, so they never add up to more than the total.

A study splits its total between its phases (stage 1, stage 2, the final seeds), by default in proportion to
their rounds, so every run of the study gets the same share; ``time_split`` weighs the phases otherwise. Within
a phase every run gets the same share. Each run then sizes itself to its share (:func:`cifarlab.train.budget.plan`),
and its share is saved in its ``config.yaml``.

A share under :data:`MIN_SHARE` is refused: the plan times a few steps and a validation first, and a run of a
few seconds would be mostly that. So is a total combined with a per-trial ``train.time_budget`` that differs
from the share, or with a searched ``train.time_budget``, ``train.epochs`` or ``train.steps``: the share sets
the first and the plan the other two.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from ..coerce import parse_duration
from ..errors import ConfigError

MIN_SHARE = 10.0  # seconds
PHASES = ("stage1", "stage2", "final")
PLANNED_KEYS = ("train.time_budget", "train.epochs", "train.steps")  # what a share and its plan set


def total_seconds(where: str, value: Any) -> float | None:
    """A total budget in seconds; None for "no total" (None, "", 0)."""
    if value is None or value == "" or (not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0):
        return None
    return parse_duration(where, value)


def rounds(runs: int, workers: int = 1) -> int:
    """How many turns ``runs`` runs take on ``workers`` workers."""
    return math.ceil(runs / max(1, workers))


def floor_ms(seconds: float) -> float:
    return math.floor(seconds * 1000 + 1e-6) / 1000


def sweep_share(total: float, trials: int, workers: int = 1, where: str = "--time") -> float:
    """Each trial's ``train.time_budget`` (seconds) in a sweep of ``trials`` trials on ``workers`` workers."""
    share = floor_ms(total / rounds(trials, workers))
    check_share(share, f"{where} {_fmt(total)} over {trials} trial(s) on {workers} worker(s)")
    return share


def study_shares(total: float, runs: dict[str, list[int]], workers: dict[str, int],
                 split: dict[str, float] | None = None, where: str = "--time") -> dict[str, float]:
    """Each phase's per-run share (seconds).

    ``runs[phase]``: the runs of each model in that phase (a model's phases run one after the other, its
    sweep's trials ``workers[phase]`` at a time). ``split``: relative weights of the phases (default: their
    rounds, so that every run gets the same share)."""
    turns = {p: sum(rounds(n, workers.get(p, 1)) for n in runs[p]) for p in runs}
    if split is None:
        weights = {p: float(turns[p]) for p in runs}
    else:
        weights = {p: float(split.get(p, 0.0)) for p in runs}
        missing = [p for p in runs if turns[p] and not weights[p]]
        if missing:
            raise ConfigError(f"time_split gives no time to {', '.join(missing)}, which has runs; give it a weight")
    whole = sum(weights[p] for p in runs if turns[p])
    shares = {}
    for p in runs:
        if not turns[p]:
            continue
        shares[p] = floor_ms(total * weights[p] / whole / turns[p])
        check_share(shares[p], f"{where} {_fmt(total)}: phase {p} ({turns[p]} round(s) of runs, "
                               f"{weights[p] / whole:.0%} of the time)")
    return shares


def check_share(share: float, what: str) -> None:
    if share < MIN_SHARE:
        raise ConfigError(f"{what} gives each run {share:g}s, under the minimum of {MIN_SHARE:g}s: give more time "
                          f"or fewer runs")


def parse_split(value: Any, where: str = "time_split") -> dict[str, float] | None:
    """``time_split: {stage1: 2, stage2: 1, final: 1}``: relative weights (any positive numbers)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where} must be a mapping of {', '.join(PHASES)} to weights")
    unknown = set(value) - set(PHASES)
    if unknown:
        raise ConfigError(f"unknown phase(s) in {where}: {', '.join(sorted(map(str, unknown)))} "
                          f"(expected: {', '.join(PHASES)})")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{where}.{k} must be a number >= 0, got {v!r}")
        out[k] = float(v)
    if not any(out.values()):
        raise ConfigError(f"{where} gives no phase any time")
    return out


def with_share(base: dict[str, Any], share: float, searched: set[str] | frozenset = frozenset(),
               where: str = "--time") -> dict[str, Any]:
    """``base`` (a run config as a dict) with ``train.time_budget = share``; refuses a conflicting per-trial
    budget in the base, a base ``train.steps``, or a searched key the share and its plan set."""
    clash = sorted(set(searched) & set(PLANNED_KEYS))
    if clash:
        raise ConfigError(f"{where} sizes every trial (train.time_budget, and from it train.steps and train.epochs), "
                          f"but the sweep also sets {', '.join(clash)}: remove it from the sweep's parameters")
    train = base.get("train") or {}
    own = train.get("time_budget")
    if own not in (None, "", 0) and abs(parse_duration("train.time_budget", own) - share) > 1e-3:
        raise ConfigError(f"{where} gives each trial {share:g}s, but the config sets train.time_budget={own!r}: "
                          f"give one of them (--set train.time_budget=0 clears the config's)")
    if train.get("steps"):
        raise ConfigError(f"{where} sizes every trial's steps, but the config sets train.steps={train['steps']}: "
                          f"clear it (--set train.steps=0)")
    out = copy.deepcopy(base)
    out.setdefault("train", {})["time_budget"] = share
    return out


def _fmt(seconds: float) -> str:
    return f"{seconds:g}s"
