"""A study file (``configs/studies/*.yaml``): the data, the models, and where to write.

.. code-block:: yaml

    name: seed-study                 # the study directory is OUT/NAME
    out: studies                     # default: studies (relative to the working directory)
    set:                             # overrides for every stage of every model (data path, device, ...)
      data.path: /data/cifar10
    seeds: 3                         # default final seeds of every model
    time: 6h                         # optional total wall-clock budget, shared out over every run (--time wins)
    time_split: {stage1: 2, stage2: 1, final: 1}   # optional weights of the phases (default: by their runs)
    models:
      cnn:
        config: ../cnn.yaml          # base recipe (default: the sweep file's cifarlab.config)
        sweep: ../sweeps/cnn-stage1.yaml   # stage-1 sweep file (W&B format), or an inline mapping
        stage1_trials: 16            # default: the sweep's run_cap
        sweep_set: {}                # overrides for both sweeps of this model only
        top: 5                       # stage 2 covers the ranges of the top N stage-1 trials
        stage2_trials: 8
        final:
          epochs: 120                # train.epochs of the final runs
          seeds: 3
          set: {data.train_size: 40000, data.val_size: 10000}   # e.g. undo the sweeps' data subset

Paths are relative to the study file. Unknown keys are refused, naming the key.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import override_keys
from ..errors import ConfigError
from ..sweep.shares import parse_split, total_seconds
from ..sweep.spec import load_sweep_file

_TOP_KEYS = {"name", "description", "out", "set", "seeds", "models", "time", "time_split"}
_MODEL_KEYS = {"config", "sweep", "stage1_trials", "sweep_set", "top", "stage2_trials", "final"}
_FINAL_KEYS = {"epochs", "seeds", "set"}


@dataclass
class ModelPlan:
    name: str
    sweep: Path | dict[str, Any]  # a sweep file, or an inline sweep mapping
    config: Path | None
    stage1_trials: int | None
    top: int
    stage2_trials: int
    final_epochs: int | None
    seeds: int
    sweep_set: list[str] = field(default_factory=list)
    final_set: list[str] = field(default_factory=list)


@dataclass
class StudySpec:
    name: str
    path: Path
    out: Path
    overrides: list[str]
    models: list[ModelPlan]
    raw: dict[str, Any]
    time: float | None = None  # total seconds (``time``, or ``--time``), shared out by :func:`time_shares`
    time_split: dict[str, float] | None = None
    shares: dict[str, float] = field(default_factory=dict)  # per-run seconds of each phase

    def time_shares(self, workers: int = 1) -> dict[str, float]:
        """Each phase's per-run ``train.time_budget`` (seconds), from the total; {} without one.

        The sweeps run ``workers`` trials at a time, the final seeds one at a time (:mod:`cifarlab.sweep.shares`)."""
        from ..sweep.shares import study_shares

        if self.time is None:
            return {}
        for plan in self.models:
            for key in override_keys(self.overrides + plan.sweep_set + plan.final_set):
                if key in ("train.time_budget", "train.steps"):
                    raise ConfigError(f"the study's time {self.time:g}s sizes every run, but models.{plan.name} "
                                      f"also sets {key} (set, sweep_set or final.set): give one of them")
        runs = {"stage1": [_stage1_trials(p) for p in self.models], "stage2": [p.stage2_trials for p in self.models],
                "final": [p.seeds for p in self.models]}
        return study_shares(self.time, runs, {"stage1": workers, "stage2": workers, "final": 1}, self.time_split,
                            where=f"study time {self.time:g}s")

    @property
    def study_dir(self) -> Path:
        return self.out / self.name

    def dirs(self) -> dict[str, dict[str, Path]]:
        """Where each model's sweeps and final group live (what the report reads)."""
        sweeps = self.study_dir / "sweeps"
        return {p.name: {"stage1": sweeps / f"{self.name}-{p.name}-stage1",
                         "stage2": sweeps / f"{self.name}-{p.name}-stage2",
                         "final": self.study_dir / "final" / p.name} for p in self.models}

    def fingerprint(self) -> str:
        """A hash of the study as parsed (comments and key order do not count)."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stage1_trials(plan: ModelPlan) -> int:
    """A model's stage-1 trials: ``stage1_trials``, else its sweep's ``run_cap`` (a study with a time budget
    shares it out over a known number of runs)."""
    if plan.stage1_trials:
        return plan.stage1_trials
    raw = plan.sweep if isinstance(plan.sweep, dict) else load_sweep_file(plan.sweep)
    cap = raw.get("run_cap")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ConfigError(f"the study's time is shared out over its runs: give models.{plan.name}.stage1_trials "
                          f"or run_cap in its sweep")
    return cap


def _overrides(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else ('null' if v is None else v)}"
                for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise ConfigError(f"{where} must be a mapping {{section.key: value}} or a list of 'section.key=value'")


def _int(value: Any, where: str, minimum: int = 1, default: int | None = None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _unknown(d: dict, allowed: set[str], where: str) -> None:
    extra = set(d) - allowed
    if extra:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(sorted(map(str, extra)))} "
                          f"(expected: {', '.join(sorted(allowed))})")


def _inline_sweep(sweep: dict, base: Path, where: str) -> dict:
    """An inline sweep, its ``cifarlab.config`` path made absolute: relative to the study file, as every path in it.

    The pipeline writes the mapping to a file under the study directory, where a relative path would no longer
    resolve."""
    ext = sweep.get("cifarlab")
    if isinstance(ext, dict) and isinstance(ext.get("config"), str):
        config = _path(ext["config"], base, f"{where}.sweep.cifarlab.config").resolve()
        sweep = {**sweep, "cifarlab": {**ext, "config": str(config)}}
    return sweep


def _path(value: Any, base: Path, where: str) -> Path:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a file path")
    p = Path(value)
    if not p.is_absolute():
        p = base / p
    if not p.is_file():
        raise ConfigError(f"{where}: file not found: {p}")
    return p


def load_study_file(path: str | Path, out: str | Path | None = None, time: str | float | None = None) -> StudySpec:
    """Parse a study file; ``time`` (``--time``) replaces its ``time`` key, and counts in its fingerprint."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"study file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"study file {path} must be a mapping with name and models")
    _unknown(raw, _TOP_KEYS, "the study file")
    name = raw.get("name") or path.stem
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"study name {name!r} may only use letters, digits, '.', '_' and '-'")
    models_raw = raw.get("models")
    if not isinstance(models_raw, dict) or not models_raw:
        raise ConfigError("study file: 'models' must map model names to their plans")
    default_seeds = _int(raw.get("seeds"), "seeds", default=3)
    base = path.parent
    models = []
    for mname, m in models_raw.items():
        where = f"models.{mname}"
        if not re.fullmatch(r"[A-Za-z0-9._-]+", str(mname)):
            raise ConfigError(f"model name {mname!r} may only use letters, digits, '.', '_' and '-'")
        if not isinstance(m, dict):
            raise ConfigError(f"{where} must be a mapping (config, sweep, top, stage2_trials, final)")
        _unknown(m, _MODEL_KEYS, where)
        if "sweep" not in m:
            raise ConfigError(f"{where}.sweep is required (a stage-1 sweep file or mapping)")
        sweep = _inline_sweep(m["sweep"], base, where) if isinstance(m["sweep"], dict) \
            else _path(m["sweep"], base, f"{where}.sweep")
        final = m.get("final") or {}
        if not isinstance(final, dict):
            raise ConfigError(f"{where}.final must be a mapping (epochs, seeds, set)")
        _unknown(final, _FINAL_KEYS, f"{where}.final")
        models.append(ModelPlan(
            name=str(mname), sweep=sweep,
            config=_path(m["config"], base, f"{where}.config") if m.get("config") is not None else None,
            stage1_trials=_int(m.get("stage1_trials"), f"{where}.stage1_trials"),
            top=_int(m.get("top"), f"{where}.top", default=5),
            stage2_trials=_int(m.get("stage2_trials"), f"{where}.stage2_trials", default=8),
            final_epochs=_int(final.get("epochs"), f"{where}.final.epochs"),
            seeds=_int(final.get("seeds"), f"{where}.final.seeds", default=default_seeds),
            sweep_set=_overrides(m.get("sweep_set"), f"{where}.sweep_set"),
            final_set=_overrides(final.get("set"), f"{where}.final.set")))
    out_dir = Path(out) if out is not None else Path(raw.get("out") or "studies")
    if time is not None:
        raw = {**raw, "time": time}
    spec = StudySpec(name=name, path=path, out=out_dir, overrides=_overrides(raw.get("set"), "set"), models=models,
                     raw=raw, time=total_seconds("--time" if time is not None else "time", raw.get("time")),
                     time_split=parse_split(raw.get("time_split")))
    return spec
