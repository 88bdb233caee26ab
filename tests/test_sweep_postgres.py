"""Two worker processes share one study through PostgreSQL: no trial lost or run twice, and the
total equals the budget. .ci/deps/postgres.sh sets the server up; elsewhere the test is skipped
when the server cannot be reached, except under CI=true, where that is a failure."""

import csv
import os
import uuid
from pathlib import Path

import pytest
import yaml

from cifarlab.sweep import open_study, run_sweep
from cifarlab.sweep.storage import _with_driver, counted

from .conftest import tiny_overrides

URL = os.environ.get("CIFARLAB_TEST_POSTGRES_URL", "postgresql://cifarlab:cifarlab@127.0.0.1:5432/cifarlab_test")


@pytest.fixture(scope="module")
def postgres_url():
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(_with_driver(URL), connect_args={"connect_timeout": 5})
        with engine.connect() as con:
            con.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as e:  # no driver, no server, wrong password: all mean "not here"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL at {URL} unreachable under CI (.ci/deps/postgres.sh should start it): {e}")
        pytest.skip(f"PostgreSQL at {URL} unreachable: {str(e).splitlines()[0]}")
    return URL


def test_two_workers_share_a_postgres_study(postgres_url, small_folder, tmp_path):
    import optuna

    name = f"pgtest-{uuid.uuid4().hex[:8]}"
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"method": "random", "metric": {"name": "val_acc", "goal": "maximize"},
                                 "parameters": {"optim.lr": {"distribution": "log_uniform_values",
                                                             "min": 0.0003, "max": 0.01},
                                                "model.hidden": {"values": [16, 32]}}}))
    budget = 5
    try:
        summary = run_sweep(f, trials=budget, workers=2, storage=postgres_url, study=name, out=tmp_path,
                            heartbeat=2, quiet=True,
                            overrides=tiny_overrides(small_folder, **{"train.epochs": 1, "model.widths": "[8, 16, 16]",
                                                                      "model.hidden": 16, "data.train_size": 200,
                                                                      "data.val_size": 100}))
        s = open_study(tmp_path / name)
        trials = s.study.get_trials()
        done = [t for t in trials if counted(t)]
        assert summary["counted"] == len(done) == budget
        assert all(t.state.name == "COMPLETE" for t in done)
        assert all(t.state.name in ("COMPLETE", "FAIL") for t in trials)  # FAIL: only a budget-gate race
        assert all("skipped" in t.user_attrs for t in trials if t.state.name == "FAIL")
        run_dirs = [Path(t.user_attrs["run_dir"].split(":", 1)[1]) for t in done]
        assert len(set(run_dirs)) == budget
        assert {d.name for d in (tmp_path / name / "trials").iterdir()} == {d.name for d in run_dirs}
        for d in run_dirs:  # trained once each: one metrics row per epoch, no repeats
            with open(d / "metrics.csv") as fh:
                assert [r["epoch"] for r in csv.DictReader(fh)] == ["1"]
    finally:
        optuna.delete_study(study_name=name, storage=_with_driver(postgres_url))
