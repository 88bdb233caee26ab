"""A study's final seeds claimed through a shared storage (``cifarlab study ... --storage URL``): two
"machines" (two processes, each with its own study folder) share one SQLite storage; one is SIGKILLed
while it trains a seed, the other takes that seed over once its heartbeat is stale and finishes the
group, and the first, run again, fetches every seed from the storage. No seed is trained twice to
the end, and each machine's group holds all seeds' results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from . import pause
from .conftest import REPO, tiny_overrides

SEEDS = 3

MACHINE = """
import sys
from pathlib import Path
import tests.pause  # pauses where $CIFARLAB_TEST_PAUSE says (tests/pause.py)
from cifarlab.config import load_config
from cifarlab.study.final import claimed_group
cfg = load_config("{config}", {overrides!r})
claimed_group(cfg, Path(sys.argv[1]), {seeds}, "{url}", "t-cnn-final", heartbeat=1, poll=0.2)
print("GROUP DONE", flush=True)
"""


def _machine(script: Path, group: Path, log: Path, pause_at: list[str] = ()) -> subprocess.Popen:
    env = pause.env(log.with_suffix(".ctrl"), list(pause_at))
    return subprocess.Popen([sys.executable, str(script), str(group)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, cwd=REPO, start_new_session=True)


def _done(proc: subprocess.Popen, log: Path) -> str:
    """The machine's output once it has ended on its own (the timeout is a deadlock guard only)."""
    proc.wait(pause.GUARD)
    return log.read_text()


def _seed_trials(url: str) -> list:
    import optuna

    return [t for t in optuna.load_study(study_name="t-cnn-final", storage=url).get_trials(deepcopy=False)
            if "seed" in t.params]


def test_final_seeds_claimed_across_machines(small_folder, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    overrides = tiny_overrides(small_folder, **{"train.epochs": 4})
    script = tmp_path / "machine.py"
    script.write_text(MACHINE.format(config=REPO / "configs" / "cnn.yaml", overrides=overrides, seeds=SEEDS, url=url))
    a, b = tmp_path / "a" / "final" / "cnn", tmp_path / "b" / "final" / "cnn"

    # machine A claims seed 0 and is SIGKILLed after its first epoch (held there until the kill)
    log_a = tmp_path / "a1.log"
    pa = _machine(script, a, log_a, ["*/seed-0@epoch=1"])
    pause.wait_paused(log_a.with_suffix(".ctrl"), 0, pa, log_a)
    os.killpg(pa.pid, signal.SIGKILL)
    pa.wait()
    assert "seed 1/3 (train.seed=0) claimed" in log_a.read_text() and "epoch   1/4" in log_a.read_text()
    assert not (a / "seed-0" / "summary.json").exists()

    # machine B: takes seed 0 over once A's heartbeat is stale, and trains all three
    log_b = tmp_path / "b.log"
    pb = _machine(script, b, log_b)
    out_b = _done(pb, log_b)
    assert pb.returncode == 0, out_b
    assert "GROUP DONE" in out_b and out_b.count(") claimed (trial") == SEEDS, out_b

    # machine A again: nothing left to train; it fetches every seed from the storage
    log_a2 = tmp_path / "a2.log"
    pa2 = _machine(script, a, log_a2)
    out_a2 = _done(pa2, log_a2)
    assert pa2.returncode == 0, out_a2
    assert ") claimed (trial" not in out_a2 and "fetched seed(s) 1, 2, 3" in out_a2, out_a2

    trials = _seed_trials(url)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["seed"] for t in complete) == list(range(SEEDS))  # each seed trained to the end once
    assert [t.params["seed"] for t in trials if t.state.name == "FAIL"] == [0]  # A's killed claim
    for k in range(SEEDS):
        local, fetched = b / f"seed-{k}", a / f"seed-{k}"
        assert (local / "best.safetensors").is_file() and not (local / "remote.json").exists()
        assert not (fetched / "best.safetensors").exists() and not (fetched / "last.pt").exists()
        assert json.loads((fetched / "remote.json").read_text())["run_dir"] == str(local.resolve())
        for name in ("metrics.csv", "summary.json", "test_metrics.json", "test_logits.npz", "config.yaml"):
            assert (fetched / name).read_bytes() == (local / name).read_bytes(), (k, name)
        z = np.load(fetched / "test_logits.npz")
        acc = float((z["logits"].argmax(1) == z["labels"]).mean())
        assert acc == pytest.approx(json.loads((local / "test_metrics.json").read_text())["test_acc"])
    # the report reads a fetched group like a local one
    from cifarlab.evaluation.groups import finished_members

    assert [k for k, _ in finished_members(a)] == list(range(SEEDS))


def test_a_sigterm_during_a_final_seed_queues_it_again(small_folder, tmp_path):
    """SIGTERM (or Ctrl-C) while a machine trains a claimed seed: the seed goes back to the queue at once, not
    marked failed, and the same machine, run again, resumes it from its own checkpoint and finishes the group."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    script = tmp_path / "machine.py"
    script.write_text(MACHINE.format(config=REPO / "configs" / "cnn.yaml", seeds=2, url=url,
                                     overrides=tiny_overrides(small_folder, **{"train.epochs": 4})))
    group = tmp_path / "a" / "final" / "cnn"
    log1 = tmp_path / "a1.log"
    p = _machine(script, group, log1, ["*/seed-0@epoch=1"])
    ctrl = log1.with_suffix(".ctrl")
    pause.wait_paused(ctrl, 0, p, log1)  # seed 0 has trained one epoch of four, and waits
    p.send_signal(signal.SIGTERM)
    pause.release(ctrl, 0)
    out1 = _done(p, log1)
    assert p.returncode != 0
    assert "stopped by SIGTERM in epoch 2" in out1 and "GROUP DONE" not in out1, out1
    assert [t.state.name for t in _seed_trials(url) if t.params["seed"] == 0] == ["FAIL", "WAITING"]  # queued again

    log2 = tmp_path / "a2.log"
    p2 = _machine(script, group, log2)
    out = _done(p2, log2)
    assert p2.returncode == 0, out
    assert "GROUP DONE" in out and "resuming" in out and "failed" not in out, out
    complete = [t.params["seed"] for t in _seed_trials(url) if t.state.name == "COMPLETE"]
    assert sorted(complete) == [0, 1]
    rows = (group / "seed-0" / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]  # resumed, each epoch once
