"""Killing a real worker process mid-trial (kill -9), through the CLI: the study loses nothing finished,
the dead worker's trial is failed and run again, and a rerun continues the same study."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from cifarlab.sweep import open_study
from cifarlab.sweep.storage import counted

from .conftest import tiny_overrides


@pytest.mark.slow
def test_kill_a_worker_mid_trial_then_rerun(small_folder, tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "kill", "method": "random", "metric": {"name": "val_acc", "goal": "maximize"},
                                 "parameters": {"optim.lr": {"distribution": "log_uniform_values",
                                                             "min": 0.0003, "max": 0.01}}}))
    sets = sum((["--set", o] for o in tiny_overrides(small_folder, **{
        "train.epochs": 8, "model.widths": "[8, 16, 16]", "model.hidden": 16, "train.batch_size": 16})), [])
    cmd = [sys.executable, "-m", "cifarlab", "sweep", "run", str(f), "--out", str(tmp_path), "--heartbeat", "1",
           "--workers", "2", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--trials", "4"], env=env)
    sweep_dir = tmp_path / "kill"
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if not (sweep_dir / "study.json").exists():
            continue
        trials = open_study(sweep_dir).study.get_trials()
        if any(t.state.name == "COMPLETE" for t in trials):
            victim = next((t for t in trials if t.state.name == "RUNNING"
                           and len((t.user_attrs.get("history") or {}).get("val_acc", [])) >= 1), None)
    assert victim is not None, "no trial was caught mid-run"
    pid = victim.user_attrs["worker"]
    os.kill(int(pid.rsplit(":", 1)[1]), signal.SIGKILL)
    finished_before = {t.number: t.value for t in open_study(sweep_dir).study.get_trials()
                       if t.state.name == "COMPLETE"}
    assert proc.wait(timeout=300) == 0  # the other worker fails the silent trial, re-runs it, ends the budget

    s = open_study(sweep_dir)
    trials = {t.number: t for t in s.study.get_trials()}
    # the trial the worker was running when the signal landed (its victim, or the next one if it had just ended)
    (dead,) = [t for t in trials.values() if t.state.name == "FAIL" and t.user_attrs.get("worker") == pid]
    assert dead.number >= victim.number and not counted(dead)
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].params == dead.params and counted(retry[0])
    assert sum(map(counted, trials.values())) == 4
    assert all(trials[n].value == v for n, v in finished_before.items())

    # a rerun with a larger budget continues the same study
    assert subprocess.run([*cmd, "--trials", "6"], env=env).returncode == 0
    trials2 = {t.number: t for t in open_study(sweep_dir).study.get_trials()}
    assert sum(map(counted, trials2.values())) == 6
    assert all(trials2[n].value == t.value and trials2[n].state == t.state for n, t in trials.items())
