"""train.time_budget (--time): the plan's arithmetic on timed costs, a run that ends at its planned step with
its schedule complete, and a resume that continues the plan. The timings are replaced by fixed costs here, so
nothing depends on this machine's speed; benchmarks/time_budget.py measures how close a real run lands."""

from __future__ import annotations

import json

import pytest
import yaml

from cifarlab.config import load_config
from cifarlab.errors import ConfigError
from cifarlab.coerce import parse_duration
from cifarlab.train import budget, fit
from cifarlab.train.checkpoint import load_checkpoint

from .conftest import REPO, tiny_overrides

REAL_TIME_STEPS, REAL_TIME_VALIDATION = budget._time_steps, budget._time_validation


def test_durations_parse_with_units_and_bad_ones_are_one_line_errors():
    assert parse_duration("t", "90s") == 90 and parse_duration("t", "10m") == 600
    assert parse_duration("t", "1.5h") == 5400 and parse_duration("t", 42) == 42
    for bad in ("ten minutes", "5d", "-3m", "nan"):
        with pytest.raises(ConfigError, match="train.time_budget"):
            load_config(None, [f"train.time_budget={bad}"])
    assert not load_config(None, ["train.time_budget=0"]).train.time_budget  # 0 (and "") is off


@pytest.fixture
def fixed_costs(monkeypatch):
    """A step costs 0.05 s and a validation pass 0.2 s, whatever the machine; nothing else is spent."""
    monkeypatch.setattr(budget, "_time_steps", lambda parts: 0.05)
    monkeypatch.setattr(budget, "_time_validation", lambda parts: 0.2)
    clock = iter(range(10**6))
    monkeypatch.setattr(budget.time, "perf_counter", lambda: float(next(clock)) * 0.0)
    monkeypatch.setattr(budget, "_step_clock", lambda: 0.0)  # the run's own steps: no correction of the plan


def test_a_budget_sets_the_steps_and_the_schedule_ends_with_them(small_folder, tmp_path, fixed_costs):
    # 400 training images at batch 64: 6 steps an epoch. Budget 3 s less the 2% margin = 2.94 s, with a
    # validation (0.2 s) after each epoch: 0.05 * 34 + 0.2 * 6 = 2.90 fits, 35 steps (2.95) do not: 34 steps,
    # five whole epochs and 4 steps of a sixth.
    over = tiny_overrides(small_folder, **{"train.time_budget": "3s", "optim.schedule": "linear",
                                           "optim.warmup_fraction": 0.1, "train.val_every": 1})
    summary = fit(load_config(REPO / "configs" / "cnn.yaml", over), tmp_path, "b", quiet=True)
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["train"]
    assert (saved["steps"], saved["epochs"]) == (34, 6) and summary["epochs"] == 6
    assert summary["time_budget_seconds"] == 3.0
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["train_state"]["global_step"] == 34  # the partial last epoch stopped at the planned step
    lrs = [float(r.split(",")[5]) for r in (tmp_path / "b" / "metrics.csv").read_text().splitlines()[1:]]
    assert ckpt["scheduler"]["last_epoch"] == 34 and lrs[-1] < lrs[1]  # the decay ran to its end at step 34


def test_a_budget_run_is_the_fixed_run_of_its_planned_length(small_folder, tmp_path, fixed_costs, monkeypatch):
    """The plan's timing trains copies of the model and optimizer, not the run's own: a --time run and a run
    without a budget given the plan's steps and epochs end bit-exact alike (the copies' steps run; only the
    seconds they report are fixed, so that the plan is). Timing on the run's own model fails it."""
    from .test_resume import assert_same_run

    monkeypatch.setattr(budget, "_time_steps", lambda parts: (REAL_TIME_STEPS(parts), 0.05)[1])
    monkeypatch.setattr(budget, "_time_validation", lambda parts: (REAL_TIME_VALIDATION(parts), 0.2)[1])
    recipe = {"optim.schedule": "linear", "optim.warmup_fraction": 0.1, "train.val_every": 1}
    fit(load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder, **recipe, **{
        "train.time_budget": "3s"})), tmp_path, "budget", quiet=True)
    saved = yaml.safe_load((tmp_path / "budget" / "config.yaml").read_text())["train"]
    assert (saved["steps"], saved["epochs"]) == (34, 6)
    fit(load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder, **recipe, **{
        "train.steps": 34, "train.epochs": 6})), tmp_path, "fixed", quiet=True)
    assert_same_run(tmp_path / "budget", tmp_path / "fixed", summary_aside=frozenset({"time_budget_seconds"}))


def test_a_killed_budget_run_resumes_into_its_plan_bit_exact(small_folder, tmp_path, fixed_costs, monkeypatch):
    """Batch 8: 50 steps an epoch; 6 s at the fixed costs plan 105 steps (two epochs and 5 steps of a third).
    Ctrl-C in the second epoch, then --resume: the resumed run reads its plan from config.yaml, times nothing
    again, and ends as the uninterrupted run did."""
    import signal

    from .interrupts import ctrl_c_at
    from .test_resume import _cli, _sets, assert_same_run

    args = ["train", "--config", str(REPO / "configs/cnn.yaml"), "--out", str(tmp_path), "--time", "6s",
            *_sets(small_folder, **{"train.val_every": 1, "train.epochs": 2})]
    assert _cli(*args, "--name", "clean") == 0
    with ctrl_c_at(monkeypatch, epoch=1, step=20):
        assert _cli(*args, "--name", "run") == 128 + signal.SIGINT
    monkeypatch.setattr(budget, "_time_steps", lambda parts: pytest.fail("a resumed run planned again"))
    assert _cli("train", "--resume", str(tmp_path / "run")) == 0
    assert_same_run(tmp_path / "run", tmp_path / "clean")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert saved["steps"] > 0 and load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["global_step"] == \
        saved["steps"]


def test_the_plan_is_corrected_once_from_the_runs_own_steps(small_folder, tmp_path, fixed_costs, monkeypatch):
    """The copies' steps said 0.05 s; the run's own steps take 0.1 s. After REPLAN_FRACTION of the plan (step 5
    of 34, in the first 6-step epoch) the run is re-planned for what is left: 2.94 s hold 19 more steps and four
    validations (1.9 + 0.8 = 2.7 s; 20 more would need a fifth epoch: 3.0 s), 24 in all. The schedule is rebuilt
    for 24 steps from step 5 on and ends with them; config.yaml and the checkpoint hold the new plan."""
    from cifarlab.train.optim import build_scheduler

    ticks = iter(range(10**6))
    monkeypatch.setattr(budget, "_step_clock", lambda: next(ticks) * 0.1)
    over = tiny_overrides(small_folder, **{"train.time_budget": "3s", "optim.schedule": "linear",
                                           "optim.warmup_fraction": 0.1, "train.val_every": 1})
    cfg = load_config(REPO / "configs" / "cnn.yaml", over)
    summary = fit(cfg, tmp_path, "b", quiet=True)
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["train"]
    assert (saved["steps"], saved["epochs"]) == (24, 4) and summary["epochs"] == 4
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["train_state"]["global_step"] == 24 and ckpt["config"]["train"]["steps"] == 24
    assert ckpt["scheduler"]["last_epoch"] == 24
    # The last step's learning rate is the 24-step schedule's own: the decay ended with the run.
    import torch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched, _ = build_scheduler(opt, cfg.optim, 4, 6, total_steps=24)
    for _ in range(24):
        opt.step()
        sched.step()
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_a_checkpoint_written_before_the_correction_resumes_with_its_own_plan():
    """Killed between the correction and the next checkpoint: config.yaml has the new plan, the checkpoint the
    old one it was written under; the resume takes the checkpoint's (the steps before it were trained so)."""
    cfg = load_config(None, ["train.time_budget=3s", "train.steps=24", "train.epochs=4"])
    budget.adopt_checkpoint_plan(cfg, {"config": {"train": {"steps": 34, "epochs": 6, "val_every": 1}}})
    assert (cfg.train.steps, cfg.train.epochs, cfg.train.val_every) == (34, 6, 1)
    plain = load_config(None, ["train.steps=24", "train.epochs=4"])  # no budget: nothing to adopt
    budget.adopt_checkpoint_plan(plain, {"config": {"train": {"steps": 34, "epochs": 6}}})
    assert (plain.train.steps, plain.train.epochs) == (24, 4)
