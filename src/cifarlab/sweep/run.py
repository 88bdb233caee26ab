"""Running a sweep: ``sweep run``'s one entry point, and the summary it prints.

A sweep is an Optuna study in an RDB storage (:mod:`.storage`), trials that are ordinary training
runs (:mod:`.objective`), and worker processes that share the study (:mod:`.workers`), with a trial
budget that holds across all of them. Ctrl-C / SIGTERM stop a trial after its current step
(``cifarlab.train.fit`` checkpoints) and queue it again; running the same command again continues.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import CifarlabError, ConfigError
from .objective import Worker
from .shares import sweep_share, total_seconds, with_share
from .spec import base_config, load_sweep_file, parse_sweep
from .storage import (DEFAULT_HEARTBEAT, check_same_sweep, counted, default_storage, free_study_name, make_pruner,
                      open_storage, redact)
from .workers import SweepInterrupted, run_workers, worker_threads


def run_sweep(sweep_file: str | Path, *, trials: int | None = None, workers: int = 1, storage: str | None = None,
              study: str | None = None, out: str | Path = "sweeps", config: str | Path | None = None,
              overrides: list[str] | None = None, heartbeat: int = DEFAULT_HEARTBEAT, seed: int | None = None,
              wandb: bool = False, quiet: bool = False, trackers: list[str] | None = None,
              new_study: bool = False, time: str | float | None = None,
              trial_time: float | None = None) -> dict[str, Any]:
    """Run (or continue) the sweep described by a W&B sweep file; returns a summary of the study.

    ``trials`` is the study's total budget (W&B's ``run_cap``), counted across all workers and
    all invocations: running again with the same budget finishes what an interrupted run left.
    A study is continued only with the same sweep and the same base config; with another base
    it is refused, or with ``new_study`` a new study (``NAME-2``, ``NAME-3``, ...) is started.
    ``trackers``: ``wandb`` (as ``wandb=True``), ``mlflow``, ``tensorboard``, one tracker run per trial
    (:mod:`cifarlab.trackers`; W&B logs offline under the sweep directory, one group per study).
    ``time``: the sweep's total wall-clock budget (``--time 2h``, else the file's ``cifarlab.time``), shared
    out as each trial's ``train.time_budget`` (:mod:`.shares`); ``trial_time``: that share itself, in seconds
    (a study gives its phases' shares).
    """
    import optuna

    from ..trackers import Trackers

    trackers = list(dict.fromkeys([*(trackers or []), *(["wandb"] if wandb else [])]))
    Trackers(trackers)  # a missing extra fails here, before anything is written

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if heartbeat < 1:
        raise ConfigError(f"--heartbeat must be >= 1 second, got {heartbeat}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are reported one line each, below
    raw = load_sweep_file(sweep_file)
    base = base_config(raw, sweep_file, config, overrides)
    spec = parse_sweep(raw, base)
    budget = trials or spec.run_cap or (spec.grid_size() if spec.method == "grid" else None)  # W&B: the whole grid
    if spec.method == "grid" and budget is not None and budget > spec.grid_size():
        if not quiet:
            print(f"grid of {spec.grid_size()} points: budget lowered from {budget}")
        budget = spec.grid_size()
    if budget is not None and budget < 1:
        raise ConfigError(f"--trials must be >= 1, got {budget}")
    base, spec = _time_shares(raw, base, spec, budget, workers, time, trial_time, quiet)
    make_pruner(spec, base)  # its own checks, before anything is written
    name = study or spec.name or Path(sweep_file).stem
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"study name {name!r} may only use letters, digits, '.', '_' and '-'")
    if new_study:
        name = free_study_name(name, spec.raw, out, storage)
    sweep_dir = Path(out) / name
    url = storage or default_storage(sweep_dir)
    if budget is None and storage is None and not (sweep_dir / "study.db").is_file():
        raise ConfigError("no trial budget: give --trials N or run_cap in the sweep file")  # before creating files
    store = open_storage(url)

    existing = {s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)}
    st = optuna.load_study(study_name=name, storage=store) if name in existing else None
    if st is not None:
        check_same_sweep(st.user_attrs.get("sweep"), spec.raw, name)
        budget = budget or st.user_attrs.get("budget")
    if budget is None:
        raise ConfigError("no trial budget: give --trials N or run_cap in the sweep file")
    if spec.method == "grid" and budget > spec.grid_size():
        if not quiet:
            print(f"grid of {spec.grid_size()} points: budget lowered from {budget}")
        budget = spec.grid_size()
    if st is None:
        trials_dir = sweep_dir / "trials"
        if trials_dir.is_dir() and any(trials_dir.iterdir()):
            raise CifarlabError(f"{trials_dir} holds trial runs of a study that storage {redact(url)} does not have; "
                                f"choose another --study or --out, or remove that directory")
        st = optuna.create_study(study_name=name, storage=store, direction=spec.direction, load_if_exists=True)
        if "sweep" in st.user_attrs:  # another machine created it a moment ago
            check_same_sweep(st.user_attrs["sweep"], spec.raw, name)
        else:
            st.set_user_attr("sweep", json.loads(json.dumps(spec.raw)))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    st.set_user_attr("budget", int(budget))
    from ..io import atomic_write_text  # late import (torch); `sweep report` reads these files

    atomic_write_text(sweep_dir / "study.json", json.dumps({"study": name, "storage": url}, indent=2) + "\n")
    atomic_write_text(sweep_dir / "sweep.yaml", yaml.safe_dump(spec.raw, sort_keys=False))

    run = Worker(spec=spec, base=base, storage=url, study=name, sweep_dir=str(sweep_dir.resolve()), budget=int(budget),
                 heartbeat=heartbeat, seed=seed, trackers=tuple(trackers), threads=worker_threads(workers),
                 quiet=quiet)
    if not quiet:
        print(f"sweep {name}: {spec.method}, {len(spec.params)} parameters, budget {budget} trials, "
              f"{workers} worker(s) x {run.threads} thread(s), storage {redact(url)}")
    interrupted = run_workers(run, workers)
    summary = study_summary(optuna.load_study(study_name=name, storage=store), budget)
    summary["sweep_dir"] = str(sweep_dir)
    if not quiet:
        print(format_summary(summary))
    if interrupted:
        raise SweepInterrupted(f"sweep {name} interrupted: {summary['counted']} of {budget} trials done; "
                               f"run the same command again to continue")
    return summary


def _time_shares(raw: dict[str, Any], base: dict[str, Any], spec, trials: int | None, workers: int,
                 time: str | float | None, trial_time: float | None, quiet: bool):
    """The base config and spec with each trial's share of the total budget as ``train.time_budget``
    (unchanged without a total)."""
    where = "--time" if time is not None else "cifarlab.time"
    total = None
    if trial_time is None:
        total = total_seconds(where, time if time is not None else (raw.get("cifarlab") or {}).get("time"))
        if total is None:
            return base, spec
    if trial_time is not None:
        share = float(trial_time)
    elif trials is None:
        raise ConfigError(f"{where} is shared out over the trials: give --trials N or run_cap in the sweep file")
    else:
        share = sweep_share(total, trials, workers, where)
    searched = {p.name for p in spec.params} | (set(spec.constants) - {"train.epochs"})
    base = with_share(base, share, searched, where)
    if total is not None and not quiet:
        print(f"time budget {total:g}s over {trials} trial(s), {workers} at a time: train.time_budget={share:g}s "
              f"per trial")
    return base, parse_sweep(raw, base)


def study_summary(study, budget: int | None = None) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    summary: dict[str, Any] = {"study": study.study_name, "budget": budget, "trials": len(trials), "states": states,
                               "counted": sum(map(counted, trials)), "best": None}
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    if complete:
        best = study.best_trial
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params}
    return summary


def format_summary(s: dict[str, Any]) -> str:
    states = ", ".join(f"{n.lower()} {c}" for n, c in sorted(s["states"].items()))
    line = f"study {s['study']}: {s['counted']}/{s['budget']} trials counted ({states})"
    if s["best"]:
        line += f"; best trial {s['best']['number']}: {s['best']['value']:.4f}"
    return line
