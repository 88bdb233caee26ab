"""``cifarlab study STUDY.yaml``: the study's method as one resumable pipeline.

Per model: stage-1 sweep -> narrow around its top trials -> stage-2 sweep -> the best
configuration -> final training with N seeds (a seeds group) -> test-set evaluation; then one
study report over all models (:mod:`cifarlab.report.study`).

Layout of ``OUT/NAME/``::

    state.json                  stages finished so far (written atomically after each)
    sweeps/NAME-MODEL-stage1/   sweep directories (study.db unless --storage), trials/ below
    sweeps/NAME-MODEL-stage2.yaml, sweeps/NAME-MODEL-stage2/
    models/MODEL/best.yaml      the final runs' config
    final/MODEL/seed-K/         the final seeds group
    report/study.html           the study report (+ study.json, PNGs, trials CSVs)

Killing it anywhere loses nothing finished: sweeps continue their Optuna study (finished trials
are kept, an interrupted one is queued again), the narrowed stage-2 file and best config are
written once, the seeds group skips finished seeds and resumes an unfinished one from its
checkpoint. ``state.json`` records each finished stage, so a rerun skips straight past them.
With ``--storage`` the final seeds are claimed through it, as trials are (:mod:`.final`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import optuna
import yaml

from ..config import RunConfig
from ..errors import CifarlabError
from ..evaluation.groups import members
from ..io import atomic_write_text
from ..report.study import make_study_report
from ..sweep import narrow, open_study, run_sweep
from ..sweep.results import ranked
from ..sweep.storage import DEFAULT_HEARTBEAT, counted, open_storage
from ..train.group import evaluate_seed, train_group
from .final import claimed_group
from .spec import ModelPlan, StudySpec, load_study_file

STAGES = ("stage1", "narrow", "stage2", "best", "final", "evaluate")


class StudyState:
    """``state.json``: which stages are done, with what they produced."""

    def __init__(self, spec: StudySpec):
        self.path = spec.study_dir / "state.json"
        self.data: dict[str, Any] = {"study": spec.name, "fingerprint": spec.fingerprint(), "models": {}}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CifarlabError(f"cannot read {self.path}: {e}") from None
            if old.get("fingerprint") != self.data["fingerprint"]:
                raise CifarlabError(f"{spec.path} changed since study {spec.study_dir} started (its stages were "
                                    f"run for the old file); give it another --out or name, or remove "
                                    f"{spec.study_dir}")
            self.data = old

    def done(self, model: str, stage: str) -> dict[str, Any] | None:
        return self.data["models"].get(model, {}).get(stage)

    def mark(self, model: str, stage: str, info: dict[str, Any]) -> None:
        self.data["models"].setdefault(model, {})[stage] = {**info, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


class Progress:
    def __init__(self, spec: StudySpec, log: Callable[[str], None]):
        self.spec, self.log = spec, log
        self.t0 = time.perf_counter()

    def __call__(self, model_index: int, model: str, stage: str, msg: str) -> None:
        k = STAGES.index(stage) + 1 if stage in STAGES else len(STAGES) + 1
        elapsed = time.perf_counter() - self.t0
        self.log(f"[study {self.spec.name} {elapsed:6.0f}s] model {model_index + 1}/{len(self.spec.models)} {model} | "
                 f"stage {k}/{len(STAGES)} {stage} | {msg}")


def _counted(sweep_dir: Path, name: str, storage: str | None) -> int:
    """Trials of a sweep already counted against its budget (0 when it has not started)."""
    url = storage or (json.loads((sweep_dir / "study.json").read_text())["storage"]
                      if (sweep_dir / "study.json").is_file() else None)
    if url is None:
        return 0
    try:
        st = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        return 0
    return sum(map(counted, st.get_trials(deepcopy=False)))


def run_study(study_file: str | Path, *, out: str | Path | None = None, storage: str | None = None, workers: int = 1,
              heartbeat: int | None = None, seed: int | None = 0, log: Callable[[str], None] = print,
              report: bool = True, time: str | float | None = None) -> dict[str, Any]:
    """Run (or continue) a study; returns its state (``state.json``) with the report's path.

    ``time`` (``--time``, else the file's ``time``): the study's total wall-clock budget, shared out over its
    runs (:meth:`StudySpec.time_shares`); each run trains to its share as ``train.time_budget``."""
    spec = load_study_file(study_file, out, time)
    spec.shares = spec.time_shares(workers)  # refused here, before anything is written, if a share is too small
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    state = StudyState(spec)
    state.save()
    progress = Progress(spec, log)
    if spec.shares:
        log(f"[study {spec.name}] time budget {spec.time:g}s: train.time_budget per run "
            + ", ".join(f"{phase} {share:g}s" for phase, share in spec.shares.items())
            + f" (sweeps {workers} trial(s) at a time, final seeds one at a time)")
    for i, plan in enumerate(spec.models):
        run_model(spec, plan, i, state, progress, storage=storage, workers=workers, heartbeat=heartbeat, seed=seed)
    if report:
        log(f"[study {spec.name}] writing the study report")
        path = make_study_report(spec, state.data, storage=storage)
        state.data["report"] = str(path)
        state.save()
        log(f"[study {spec.name}] done: {path}")
    return state.data


def _sweep_kwargs(storage, workers, heartbeat, seed) -> dict[str, Any]:
    kw: dict[str, Any] = {"storage": storage, "workers": workers, "seed": seed}
    if heartbeat is not None:
        kw["heartbeat"] = heartbeat
    return kw


def run_model(spec: StudySpec, plan: ModelPlan, index: int, state: StudyState, progress: Progress, *,
              storage: str | None, workers: int, heartbeat: int | None, seed: int | None) -> None:
    say = lambda stage, msg: progress(index, plan.name, stage, msg)  # noqa: E731
    sweeps = spec.study_dir / "sweeps"
    sweeps.mkdir(parents=True, exist_ok=True)
    kw = _sweep_kwargs(storage, workers, heartbeat, seed)
    names = {k: f"{spec.name}-{plan.name}-{k}" for k in ("stage1", "stage2")}

    # ---- stage 1: the wide sweep
    if not state.done(plan.name, "stage1"):
        if isinstance(plan.sweep, dict):
            sweep_file = sweeps / f"{names['stage1']}.yaml"
            if not sweep_file.is_file():
                atomic_write_text(sweep_file, yaml.safe_dump(plan.sweep, sort_keys=False))
        else:
            sweep_file = plan.sweep
        budget = plan.stage1_trials
        done = _counted(sweeps / names["stage1"], names["stage1"], storage)
        say("stage1", f"sweep {names['stage1']}: {done} trial(s) done"
                      + (f", {max(0, budget - done)} remaining" if budget else " (budget: the sweep's run_cap)"))
        s = run_sweep(sweep_file, trials=budget, study=names["stage1"], out=sweeps, config=plan.config,
                      overrides=spec.overrides + plan.sweep_set, trial_time=spec.shares.get("stage1"), **kw)
        state.mark(plan.name, "stage1", {"sweep_dir": s["sweep_dir"], "counted": s["counted"], "best": s["best"]})
    else:
        say("stage1", "done before, reused")

    # ---- narrow: the second stage's sweep file, written once
    stage2_file = sweeps / f"{names['stage2']}.yaml"
    if not state.done(plan.name, "narrow"):
        s1 = open_study(sweeps / names["stage1"], storage)
        text, mapping = narrow(s1, plan.top)
        mapping["name"] = names["stage2"]
        mapping["run_cap"] = plan.stage2_trials
        if spec.shares:  # stage 2 trains to its own share, given below
            mapping["cifarlab"]["config"].setdefault("train", {})["time_budget"] = ""
        head = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
        atomic_write_text(stage2_file, head + yaml.safe_dump(mapping, sort_keys=False))
        state.mark(plan.name, "narrow", {"file": str(stage2_file), "top": plan.top,
                                         "ranges": mapping["parameters"]})
        say("narrow", f"stage-2 ranges around the top {plan.top} trial(s) -> {stage2_file}")
    else:
        say("narrow", "done before, reused")

    # ---- stage 2: the narrowed sweep
    if not state.done(plan.name, "stage2"):
        done = _counted(sweeps / names["stage2"], names["stage2"], storage)
        say("stage2", f"sweep {names['stage2']}: {done} trial(s) done, {max(0, plan.stage2_trials - done)} remaining")
        s = run_sweep(stage2_file, trials=plan.stage2_trials, study=names["stage2"], out=sweeps,
                      trial_time=spec.shares.get("stage2"), **kw)
        state.mark(plan.name, "stage2", {"sweep_dir": s["sweep_dir"], "counted": s["counted"], "best": s["best"]})
    else:
        say("stage2", "done before, reused")

    # ---- best: the best completed trial of either stage (same trial budget and data subset: comparable)
    model_dir = spec.study_dir / "models" / plan.name
    best_file = model_dir / "best.yaml"
    if not state.done(plan.name, "best"):
        candidates = []
        for stage in ("stage1", "stage2"):
            st = open_study(sweeps / names[stage], storage)
            top = ranked(st)
            if top:
                candidates.append((top[0].value, stage, st, top[0]))
        if not candidates:
            raise CifarlabError(f"model {plan.name}: neither sweep has a completed trial (all pruned or failed)")
        maximize = candidates[0][2].spec.goal == "maximize"
        value, stage, st, trial = sorted(candidates, key=lambda c: c[0], reverse=maximize)[0]
        values = {p.name: p.decode(trial.params[p.name]) for p in st.spec.params if p.name in trial.params}
        cfg = st.spec.trial_config(st.base, values)
        cfg.apply_overrides(spec.overrides + plan.final_set)
        if plan.final_epochs:
            cfg.train.epochs = plan.final_epochs
        if spec.shares:
            cfg.train.time_budget = spec.shares["final"]
        cfg.validate()
        model_dir.mkdir(parents=True, exist_ok=True)
        head = (f"# Study {spec.name}, model {plan.name}: best trial {trial.number} of {stage} "
                f"({st.spec.metric} = {value:.4f}), with the final training's settings "
                f"(train.epochs={cfg.train.epochs}, data.train_size={cfg.data.train_size}"
                + (f", train.time_budget={cfg.train.time_budget}s" if cfg.train.time_budget else "") + ").\n"
                + "".join(f"#   {k}: {v}\n" for k, v in values.items()))
        atomic_write_text(best_file, head + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        state.mark(plan.name, "best", {"file": str(best_file), "stage": stage, "trial": trial.number, "value": value,
                                       "metric": st.spec.metric, "params": values})
        say("best", f"trial {trial.number} of {stage}: {st.spec.metric} {value:.4f} -> {best_file}")
    else:
        say("best", "done before, reused")

    # ---- final: N seeds of the best config, then the test set
    group_dir = spec.study_dir / "final" / plan.name
    if not state.done(plan.name, "final"):
        cfg = RunConfig.from_dict(yaml.safe_load(best_file.read_text())).validate()
        say("final", f"{plan.seeds} seed(s) of {cfg.train.epochs} epochs -> {group_dir}")
        if storage:  # several machines: the seeds are claimed through the storage like trials
            claimed_group(cfg, group_dir, plan.seeds, storage, f"{spec.name}-{plan.name}-final",
                          heartbeat=heartbeat or DEFAULT_HEARTBEAT, log=lambda m: say("final", m))
        else:
            train_group(cfg, group_dir.parent, group_dir.name, plan.seeds,
                        log=lambda m: say("final", m.replace(f"group {group_dir}: ", "")))
        state.mark(plan.name, "final", {"group_dir": str(group_dir), "seeds": plan.seeds})
    else:
        say("final", "done before, reused")
    if not state.done(plan.name, "evaluate"):
        accs = []
        for k, d in members(group_dir):
            evaluate_seed(d)
            accs.append(json.loads((d / "test_metrics.json").read_text())["test_acc"])
        state.mark(plan.name, "evaluate", {"test_acc": accs})
        say("evaluate", f"test accuracy per seed: {', '.join(f'{a:.4f}' for a in accs)}")
    else:
        say("evaluate", "done before, reused")
