"""What a finished (or running) study yields: the trial table, the best config, a narrowed
second-stage sweep. Everything is read from the storage (values, parameters, and the per-epoch
history each trial writes there), so it works on any machine that reaches the storage, not
only on the one that holds the trials' run directories."""

from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import CifarlabError, ConfigError
from .storage import counted, open_storage
from .spec import SweepSpec, parse_sweep


@dataclass
class Study:
    """A study opened for reading, with its sweep spec and base config."""

    study: Any  # optuna.Study
    spec: SweepSpec
    base: dict[str, Any]
    sweep_dir: Path | None

    @property
    def name(self) -> str:
        return self.study.study_name


def open_study(ref: str | Path, storage: str | None = None) -> Study:
    """Open a study by its sweep directory (``sweeps/NAME``, holding ``study.json``), or by its name
    when ``storage`` is given (a study shared through a database from another machine)."""
    import optuna

    ref_path = Path(ref)
    sweep_dir = None
    if (ref_path / "study.json").is_file():
        info = json.loads((ref_path / "study.json").read_text())
        name, url, sweep_dir = info["study"], storage or info["storage"], ref_path
    elif storage is not None:
        name, url = str(ref), storage
    else:
        raise CifarlabError(f"{ref} is not a sweep directory (no study.json); give the directory `sweep run` "
                            f"made (sweeps/NAME), or a study name with --storage URL")
    store = open_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        raise CifarlabError(f"storage holds no study named {name!r}") from None
    raw = study.user_attrs.get("sweep")
    if raw is None:
        raise CifarlabError(f"study {name!r} was not made by `cifarlab sweep run` (no sweep spec stored)")
    base = raw["cifarlab"]["config"]
    return Study(study, parse_sweep(raw, base), base, sweep_dir)


# --------------------------------------------------------------------------- table
def trial_rows(s: Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, every parameter, final/best val acc and loss, epochs, seconds."""
    rows = []
    for t in s.study.get_trials(deepcopy=False):
        h = t.user_attrs.get("history") or {}
        acc = [v for v in h.get("val_acc", []) if v is not None]
        loss = [v for v in h.get("val_loss", []) if v is not None]
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        row: dict[str, Any] = {"number": t.number, "state": t.state.name, "counted": counted(t)}
        for p in s.spec.params:
            row[p.name] = _display(p.decode(t.params[p.name])) if p.name in t.params else ""
        row.update({
            "value": t.value if t.value is not None else "",
            "final_val_acc": acc[-1] if acc else "", "best_val_acc": max(acc) if acc else "",
            "final_val_loss": loss[-1] if loss else "", "best_val_loss": min(loss) if loss else "",
            "epochs": len(h.get("val_acc", [])), "seconds": round(seconds, 2) if seconds is not None else "",
            "train_seconds": round(sum(x or 0 for x in h.get("seconds", [])), 2),
            "note": _note(t), "run_dir": t.user_attrs.get("run_dir", ""),
        })
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    from ..io import atomic_write  # a kill mid-write must not leave a torn table

    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f) -> None:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write, mode="w")
    return path


def _note(t) -> str:
    for key in ("error", "skipped", "interrupted"):
        if key in t.user_attrs:
            return f"{key}: {t.user_attrs[key]}"
    if t.state.name == "FAIL":
        return "worker died (heartbeat stopped)"
    if "failed_trial" in t.system_attrs:
        return f"retry of trial {t.system_attrs['failed_trial']}"
    return ""


def _display(v: Any) -> Any:
    return yaml.safe_dump(v, default_flow_style=True).strip() if isinstance(v, (list, dict)) else v


# --------------------------------------------------------------------------- best / narrow
def ranked(s: Study) -> list:
    """COMPLETE trials, best first (pruned trials never reached the end, so they have no final value)."""
    done = [t for t in s.study.get_trials(deepcopy=False)
            if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    return sorted(done, key=lambda t: t.value, reverse=s.spec.goal == "maximize")


def best_config_yaml(s: Study) -> str:
    """The best trial's run config as a YAML file for ``cifarlab train --config``."""
    top = ranked(s)
    if not top:
        raise CifarlabError(f"study {s.name!r} has no completed trial yet")
    t = top[0]
    values = {p.name: p.decode(t.params[p.name]) for p in s.spec.params if p.name in t.params}
    cfg = s.spec.trial_config(s.base, values)
    head = (f"# Best trial {t.number} of sweep study {s.name}: {s.spec.metric} = {t.value:.4f} ({s.spec.goal}).\n"
            f"# Its exact run config: the sweep's budget (train.epochs={cfg.train.epochs}, "
            f"data.train_size={cfg.data.train_size}) included; raise them for a full run.\n"
            + "".join(f"#   {k}: {_display(v)}\n" for k, v in values.items()))
    return head + yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def narrow(s: Study, top: int) -> tuple[str, dict[str, Any]]:
    """A second-stage sweep whose ranges just cover the ``top`` best trials: returns (YAML text, mapping).

    Categorical parameters keep the values those trials used; numeric ranges shrink to their
    minimum and maximum (the distribution, log scale and step stay).
    """
    if top < 1:
        raise ConfigError(f"--top must be >= 1, got {top}")
    best = ranked(s)[:top]
    if not best:
        raise CifarlabError(f"study {s.name!r} has no completed trial to narrow around")
    params: dict[str, Any] = {}
    for p in s.spec.params:
        used = [p.decode(t.params[p.name]) for t in best if p.name in t.params]
        if p.kind == "categorical":
            params[p.name] = {"values": [c for c in p.choices if any(c == u for u in used)]}
            continue
        lo, hi = min(used), max(used)
        if p.kind == "int":
            if p.log:
                params[p.name] = {"distribution": "q_log_uniform_values", "min": int(lo), "max": int(hi), "q": 1}
            elif p.step and p.step != 1:
                params[p.name] = {"distribution": "q_uniform", "min": int(lo), "max": int(hi), "q": int(p.step)}
            else:
                params[p.name] = {"distribution": "int_uniform", "min": int(lo), "max": int(hi)}
        elif p.log:
            params[p.name] = {"distribution": "log_uniform_values", "min": float(lo), "max": float(hi)}
        elif p.step:
            params[p.name] = {"distribution": "q_uniform", "min": float(lo), "max": float(hi), "q": float(p.step)}
        else:
            params[p.name] = {"distribution": "uniform", "min": float(lo), "max": float(hi)}
    for key, value in s.spec.constants.items():
        params[key] = {"value": value}
    raw = copy.deepcopy(s.spec.raw)
    out: dict[str, Any] = {"name": f"{s.spec.name or s.name}-top{top}", "method": raw["method"]}
    for key in ("metric", "run_cap", "early_terminate"):
        if key in raw:
            out[key] = raw[key]
    out["parameters"] = params
    out["cifarlab"] = {"config": s.base}
    head = (f"# Second stage of sweep study {s.name}: ranges cover its {len(best)} best trial(s) "
            f"({', '.join(str(t.number) for t in best)}) by {s.spec.metric} ({s.spec.goal}).\n"
            f"# Written by `cifarlab sweep narrow`; run it with `cifarlab sweep run THIS_FILE`.\n")
    return head + yaml.safe_dump(out, sort_keys=False), out
