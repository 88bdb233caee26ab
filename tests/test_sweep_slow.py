"""Killing a real worker process mid-trial (kill -9), through the CLI: the study loses nothing finished,
the dead worker's trial is failed and run again, and a rerun continues the same study."""

import os
import signal
import subprocess
import sys

import pytest
import yaml

from cifarlab.sweep import open_study
from cifarlab.sweep.storage import counted

from . import pause
from .conftest import tiny_overrides


@pytest.mark.slow
def test_kill_a_worker_mid_trial_then_rerun(small_folder, tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "kill", "method": "random", "metric": {"name": "val_acc", "goal": "maximize"},
                                 "parameters": {"optim.lr": {"distribution": "log_uniform_values",
                                                             "min": 0.0003, "max": 0.01}}}))
    sets = sum((["--set", o] for o in tiny_overrides(small_folder, **{
        "train.epochs": 3, "model.widths": "[8, 16, 16]", "model.hidden": 16, "train.batch_size": 16})), [])
    args = ["sweep", "run", str(f), "--out", str(tmp_path), "--heartbeat", "1", "--workers", "2", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Trial 2 starts once one of the first two has finished; its worker pauses after the trial's first epoch
    # (of 3, recorded in the storage) and is killed there (tests/pause.py).
    ctrl = tmp_path / "ctrl"
    proc = subprocess.Popen(pause.command(*args, "--trials", "4"),
                            env=pause.env(ctrl, ["*/kill/trials/trial-0002@epoch=1"], env))
    try:
        pid = pause.wait_paused(ctrl, 0, proc)
        sweep_dir = tmp_path / "kill"
        trials = open_study(sweep_dir).study.get_trials()
        (victim,) = [t for t in trials if t.number == 2]
        assert victim.state.name == "RUNNING" and len(victim.user_attrs["history"]["val_acc"]) == 1
        assert victim.user_attrs["worker"].rsplit(":", 1)[1] == str(pid)
        assert any(t.state.name == "COMPLETE" for t in trials)
        os.kill(pid, signal.SIGKILL)
        finished_before = {t.number: t.value for t in open_study(sweep_dir).study.get_trials()
                           if t.state.name == "COMPLETE"}
        # the other worker fails the silent trial, re-runs it, ends the budget (the timeout: a deadlock guard)
        assert proc.wait(timeout=pause.GUARD) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

    s = open_study(sweep_dir)
    trials = {t.number: t for t in s.study.get_trials()}
    (dead,) = [t for t in trials.values() if t.state.name == "FAIL"]
    assert dead.number == victim.number and not counted(dead)
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].params == dead.params and counted(retry[0])
    assert sum(map(counted, trials.values())) == 4
    assert all(trials[n].value == v for n, v in finished_before.items())

    # a rerun with a larger budget continues the same study
    cmd = [sys.executable, "-m", "cifarlab", *args, "--trials", "6"]
    assert subprocess.run(cmd, env=env, timeout=pause.GUARD).returncode == 0
    trials2 = {t.number: t for t in open_study(sweep_dir).study.get_trials()}
    assert sum(map(counted, trials2.values())) == 6
    assert all(trials2[n].value == t.value and trials2[n].state == t.state for n, t in trials.items())
