"""An audit's folds shared by two "machines" (two processes, each with its own -o) through one SQLite storage
(``cifarlab audit ... --storage URL``): machine A claims fold 0 and is held after its first epoch; machine B,
started then, claims fold 1, trains it and waits; A, let go, finishes fold 0. Each fold is trained once, each
machine fetches the other's fold from the storage and writes the same audit. No step depends on timing: A is
held until B has claimed (tests/pause.py: B is held as its fold starts), and which of the two ends first changes
nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import uuid

import numpy as np
import pytest

from cifarlab.sweep.storage import _with_driver

from . import pause
from .conftest import REPO, tiny_overrides
from .test_sweep_postgres import postgres_url  # noqa: F401  (a fixture)

MACHINE = """
import sys
import tests.pause  # pauses where $CIFARLAB_TEST_PAUSE says (tests/pause.py)
from cifarlab.audit.run import audit_data
from cifarlab.config import load_config
cfg = load_config("{config}", {overrides!r})
res = audit_data(cfg, sys.argv[1], folds=2, storage="{url}", heartbeat=1, poll=0.2, quiet=True)
print("AUDIT DONE", res["label_issues"], flush=True)
"""


def _machine(script: Path, out: Path, log: Path, pause_at: list[str] = ()) -> subprocess.Popen:
    env = pause.env(log.with_suffix(".ctrl"), list(pause_at))
    return subprocess.Popen([sys.executable, str(script), str(out)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, cwd=REPO, start_new_session=True)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_folds_claimed_across_machines(kind, small_folder, tmp_path, request):
    """PostgreSQL: the server of tests/test_sweep_postgres.py (skipped where unreachable, a failure under CI)."""
    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    # a seed of its own: the study's name (config and data) is new on a server that outlives the test
    seed = uuid.uuid4().int % 10**6
    script = tmp_path / "machine.py"
    script.write_text(MACHINE.format(config=REPO / "configs" / "cnn.yaml", url=url, overrides=tiny_overrides(
        small_folder, **{"train.epochs": 2, "train.seed": seed})))
    a, b = tmp_path / "a", tmp_path / "b"
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    pa = _machine(script, a, log_a, ["*/fold-0@epoch=1"])
    pause.wait_paused(log_a.with_suffix(".ctrl"), 0, pa, log_a)  # A holds fold 0, one epoch in
    pb = _machine(script, b, log_b, ["*/fold-1@start"])
    pause.wait_paused(log_b.with_suffix(".ctrl"), 0, pb, log_b)  # B has claimed fold 1 (fold 0 is held)
    # both go on: B trains fold 1, A fold 0; whichever ends first waits for the other
    pause.release(log_a.with_suffix(".ctrl"), 0)
    pause.release(log_b.with_suffix(".ctrl"), 0)
    pa.wait(pause.GUARD)
    pb.wait(pause.GUARD)
    out_a, out_b = log_a.read_text(), log_b.read_text()
    assert pa.returncode == 0 and pb.returncode == 0, (out_a, out_b)
    assert "fold 1/2 claimed" in out_a and "fold 2/2 claimed" not in out_a, out_a
    assert "fold 2/2 claimed" in out_b and "fold 1/2 claimed" not in out_b, out_b
    assert "fetched fold(s) 1 from the storage" in out_a and "fetched fold(s) 0 from the storage" in out_b

    name = next(m.split(" as study ")[1].split()[0] for m in out_a.splitlines() if " as study " in m)
    trials = optuna.load_study(study_name=name, storage=_with_driver(url)).get_trials(deepcopy=False)
    done = [t.params["fold"] for t in trials if t.state.name == "COMPLETE"]
    assert sorted(done) == [0, 1] and len(trials) == 2  # each fold claimed and trained once
    for here, there, k in ((a, b, 1), (b, a, 0)):
        fetched, local = here / "folds" / f"fold-{k}", there / "folds" / f"fold-{k}"
        assert (local / "best.safetensors").is_file() and not (fetched / "best.safetensors").exists()
        assert json.loads((fetched / "remote.json").read_text())["run_dir"] == str(local.resolve())
        za, zb = np.load(fetched / "audit.npz"), np.load(local / "audit.npz")
        assert set(za.files) == set(zb.files) and all((za[f] == zb[f]).all() for f in za.files)
    # the two machines' audits are the same
    for f in ("label_issues.csv", "duplicates.csv", "outliers.csv"):
        assert (a / f).read_text() == (b / f).read_text(), f
    # a rerun on either machine trains nothing and fetches nothing
    log_a2 = tmp_path / "a2.log"
    pa2 = _machine(script, a, log_a2)
    pa2.wait(pause.GUARD)
    out = log_a2.read_text()
    assert pa2.returncode == 0 and "AUDIT DONE" in out, out
    assert " claimed (trial" not in out and "fetched fold" not in out, out


def test_overwrite_with_a_storage_is_refused(small_folder, tmp_path):
    from cifarlab.audit.run import audit_data
    from cifarlab.config import load_config
    from cifarlab.errors import CifarlabError

    cfg = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder))
    with pytest.raises(CifarlabError, match="--overwrite with --storage"):
        audit_data(cfg, tmp_path / "o", folds=2, storage=f"sqlite:///{tmp_path / 's.db'}", overwrite=True)


def test_the_study_is_named_by_the_config_and_the_data(small_folder, tmp_path):
    from cifarlab.audit.claimed import study_name
    from cifarlab.config import load_config
    from cifarlab.data import load_data

    from .conftest import make_subset

    cfg = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder))
    data = load_data(cfg.data)
    name = study_name(cfg, 2, data)
    moved = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder, **{"train.device": "cuda"}))
    assert study_name(moved, 2, data) == name  # another machine: its device and data.path may differ
    assert study_name(cfg, 3, data) != name
    other = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(make_subset(tmp_path / "o", 50, 20)))
    assert study_name(other, 2, load_data(other.data)) != name  # the same command on other data
