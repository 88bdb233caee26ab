"""A total time budget shared out: ``sweep run --time`` and ``study --time`` give every run its share as
``train.time_budget`` (saved in its config.yaml), the shares add up to the total, and a share too small or a
per-run budget that conflicts is a one-line error. The plan's timings are fixed costs here (as in
tests/test_time_budget.py), so nothing depends on this machine's speed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cifarlab.cli.main import main
from cifarlab.errors import ConfigError
from cifarlab.study import run_study
from cifarlab.sweep import run_sweep
from cifarlab.sweep.shares import MIN_SHARE, study_shares, sweep_share
from cifarlab.train import budget

from .conftest import REPO, tiny_overrides


@pytest.fixture
def fixed_costs(monkeypatch):
    """A step and a validation pass cost 1 s each, whatever the machine, and nothing else is spent: a 12 s share
    plans a handful of steps."""
    monkeypatch.setattr(budget, "_time_steps", lambda parts: 1.0)
    monkeypatch.setattr(budget, "_time_validation", lambda parts: 1.0)
    monkeypatch.setattr(budget.time, "perf_counter", lambda: 0.0)


def _sweep(path: Path, **extra) -> Path:
    raw = {"method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
           "parameters": {"optim.lr": {"values": [0.001, 0.002, 0.003]}}, **extra}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _tiny(small_folder: Path, **extra) -> list[str]:
    return tiny_overrides(small_folder, **{"model.widths": "[8, 16, 16]", "train.epochs": 2, **extra})


def _budgets(run_dirs) -> list[float]:
    """Each run's train.time_budget from its config.yaml; each also planned its steps from it."""
    out = []
    for d in run_dirs:
        train = yaml.safe_load((Path(d) / "config.yaml").read_text())["train"]
        assert train["steps"] > 0, f"{d} did not plan its steps"
        out.append(float(train["time_budget"]))
    return out


def _cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --------------------------------------------------------------------------- the arithmetic
def test_a_sweep_share_is_the_total_over_its_rounds():
    assert sweep_share(3600, 6) == 600  # one worker: total / trials
    assert sweep_share(3600, 6, workers=2) == 1200  # two at a time: three rounds of 1200 s fill the hour
    assert sweep_share(3600, 5, workers=2) == 1200  # five trials on two workers: still three rounds
    share = sweep_share(40, 3)
    assert share == 13.333 and 40 - 0.003 <= 3 * share <= 40  # floored to the ms: never over the total
    with pytest.raises(ConfigError, match="under the minimum"):
        sweep_share(10 * MIN_SHARE, 11)


def test_study_phases_share_by_their_rounds_or_by_time_split():
    runs = {"stage1": [8, 4], "stage2": [4, 4], "final": [3, 3]}  # two models
    shares = study_shares(2600, runs, {"stage1": 1, "stage2": 1, "final": 1})
    assert shares == {"stage1": 100, "stage2": 100, "final": 100}  # 26 runs, one at a time: the same share each
    shares = study_shares(2600, runs, {"stage1": 2, "stage2": 2, "final": 1})  # sweeps: 6 + 4 rounds, finals 6
    assert shares == {"stage1": 162.5, "stage2": 162.5, "final": 162.5}
    split = study_shares(2600, runs, {"stage1": 1, "stage2": 1, "final": 1}, {"stage1": 2, "stage2": 1, "final": 1})
    assert split == {"stage1": 108.333, "stage2": 81.25, "final": 108.333}
    total = sum(split[p] * sum(n) for p, n in runs.items())
    assert 2600 - 0.03 <= total <= 2600
    with pytest.raises(ConfigError, match="phase final"):
        study_shares(300, runs, {"stage1": 1, "stage2": 1, "final": 1}, {"stage1": 1, "stage2": 1, "final": 0.01})
    with pytest.raises(ConfigError, match="no time to final"):
        study_shares(3000, runs, {"stage1": 1, "stage2": 1, "final": 1}, {"stage1": 1, "stage2": 1})


# --------------------------------------------------------------------------- sweeps
def test_each_sweep_trial_trains_to_its_share(small_folder, tmp_path, fixed_costs):
    f = _sweep(tmp_path / "s.yaml")
    summary = run_sweep(f, out=tmp_path, quiet=True, overrides=_tiny(small_folder), time="40s")
    assert summary["counted"] == 3
    trials = sorted((tmp_path / "s" / "trials").iterdir())
    shares = _budgets(trials)
    assert shares == [13.333] * 3 and 40 - 0.003 <= sum(shares) <= 40
    for d in trials:
        assert yaml.safe_load((d / "summary.json").read_text())["time_budget_seconds"] == pytest.approx(13.333)
    # The file's cifarlab.time does the same; a rerun with the same total continues the same study.
    g = _sweep(tmp_path / "t.yaml", cifarlab={"time": "1m"}, run_cap=2)
    run_sweep(g, out=tmp_path, quiet=True, overrides=_tiny(small_folder))
    assert _budgets(sorted((tmp_path / "t" / "trials").iterdir())) == [30.0, 30.0]


def test_bad_sweep_budgets_are_one_line_errors(small_folder, tmp_path, capsys):
    f = _sweep(tmp_path / "s.yaml")
    run = ["sweep", "run", str(f), "--out", str(tmp_path), *[a for o in _tiny(small_folder) for a in ("--set", o)]]
    assert "under the minimum of 10s" in _cli_error(capsys, *run, "--time", "20s")
    assert "train.time_budget='5m'" in _cli_error(capsys, *run, "--time", "1h", "--set", "train.time_budget=5m")
    assert "not a duration" in _cli_error(capsys, *run, "--time", "an hour")
    epochs = _sweep(tmp_path / "e.yaml", parameters={"train.epochs": {"values": [1, 2]}})
    assert "also sets train.epochs" in _cli_error(capsys, "sweep", "run", str(epochs), "--out", str(tmp_path),
                                                  "--time", "1h", "--set", f"data.path={small_folder}")
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()  # refused before anything is written


# --------------------------------------------------------------------------- studies
def _study_file(tmp: Path, small_folder: Path, **top) -> Path:
    pairs = (o.split("=", 1) for o in _tiny(small_folder))
    cset = {k: v if k == "data.path" else yaml.safe_load(v) for k, v in pairs}
    sweep = {"method": "random", "metric": {"name": "val_acc", "goal": "maximize"}, "run_cap": 2,
             "parameters": {"optim.lr": {"distribution": "log_uniform_values", "min": 0.0005, "max": 0.005}},
             "cifarlab": {"config": str(REPO / "configs" / "cnn.yaml"), "set": cset}}
    study = {"name": "timed", "out": str(tmp / "studies"), "seeds": 1,
             "models": {"cnn": {"sweep": sweep, "top": 1, "stage2_trials": 1}}, **top}
    path = tmp / "timed.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_a_study_shares_its_total_between_its_phases(small_folder, tmp_path, fixed_costs):
    # 2 stage-1 trials, 1 stage-2 trial, 1 final seed; weights 1 : 1 : 2 of 120 s: 30 s for stage 1 (15 s a
    # trial), 30 s for stage 2, 60 s for the seed.
    f = _study_file(tmp_path, small_folder, time_split={"stage1": 1, "stage2": 1, "final": 2})
    lines: list[str] = []
    run_study(f, time="2m", report=False, log=lines.append)
    root = tmp_path / "studies" / "timed"
    stage1 = _budgets(sorted((root / "sweeps" / "timed-cnn-stage1" / "trials").iterdir()))
    stage2 = _budgets(sorted((root / "sweeps" / "timed-cnn-stage2" / "trials").iterdir()))
    final = _budgets([root / "final" / "cnn" / "seed-0"])
    assert (stage1, stage2, final) == ([15.0, 15.0], [30.0], [60.0])
    assert sum(stage1 + stage2 + final) == 120
    assert any("train.time_budget per run stage1 15s, stage2 30s, final 60s" in line for line in lines)
    # The total is part of the study's identity: another one is refused rather than mixing budgets.
    with pytest.raises(Exception, match="changed since study"):
        run_study(f, time="3m", report=False, log=lambda m: None)


def test_bad_study_budgets_are_one_line_errors(small_folder, tmp_path, capsys):
    f = _study_file(tmp_path, small_folder)
    assert "under the minimum" in _cli_error(capsys, "study", str(f), "--time", "30s")  # 4 runs: 7.5 s each
    g = _study_file(tmp_path, small_folder, time="1h", set={"train.time_budget": "5m"})
    assert "also sets train.time_budget" in _cli_error(capsys, "study", str(g))
    assert not (tmp_path / "studies" / "timed").exists()
