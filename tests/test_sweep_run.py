"""Sweeps that train: two workers with hyperband pruning, a dead worker's trial re-run, an interrupt,
and the narrow / report / best outputs, all on the small shared image folder."""

import csv
import json
import os
import signal
import warnings
from pathlib import Path

import optuna
import pytest
import yaml

from cifarlab.cli.main import main
from cifarlab.config import load_config
from cifarlab.errors import ConfigError
from cifarlab.sweep import SweepInterrupted, best_config_yaml, narrow, open_study, run_sweep
from cifarlab.sweep.storage import counted, open_storage

from .conftest import tiny_overrides


def write_sweep(path: Path, **raw) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tiny(small_folder, **extra):
    return tiny_overrides(small_folder, **{"model.widths": "[8, 16, 16]", "model.hidden": 32, **extra})


# Learning rate 1e-9 leaves the network at its initialization, measurably worse after one epoch than
# 3e-3 (same seed, same init). Trial n runs grid point n of the sampler's (shuffled) grid, and the
# values are listed so that the two good points come first: each weak trial then starts after a good
# one has finished, reaches the first hyperband rung behind it and is pruned there.
def prune_sweep() -> dict:
    from cifarlab.config import RunConfig
    from cifarlab.sweep import parse_sweep
    from cifarlab.sweep.storage import make_sampler

    for lrs in ([0.003, 1.0e-9], [1.0e-9, 0.003]):
        raw = {"name": "prune", "method": "grid", "metric": {"name": "val_loss", "goal": "minimize"},
               "early_terminate": {"type": "hyperband", "min_iter": 1},  # eta 3, 2 epochs: one bracket, rung 1
               "parameters": {"optim.lr": {"values": lrs}, "optim.weight_decay": {"values": [0.0001, 0.001]}}}
        grid = make_sampler(parse_sweep(raw, RunConfig().validate().to_dict()), None)._all_grids  # (lr, wd)
        if all(g[0] == 0.003 for g in grid[:2]):
            return raw
    raise AssertionError("no listing order puts both good grid points first; Optuna's grid shuffle changed")


@pytest.fixture(scope="module")
def pruned_sweep(small_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweeps")
    f = write_sweep(out / "prune.yaml", **prune_sweep())
    summary = run_sweep(f, workers=2, out=out, heartbeat=2, seed=0, quiet=True,
                        overrides=tiny(small_folder, **{"train.epochs": 2, "train.batch_size": 16}))
    return Path(summary["sweep_dir"]), summary


def test_two_workers_prune_and_keep_the_budget(pruned_sweep):
    sweep_dir, summary = pruned_sweep
    s = open_study(sweep_dir)
    trials = s.study.get_trials()
    done = [t for t in trials if counted(t)]
    assert summary["counted"] == len(done) == 4  # the grid's 4 points, run by 2 processes
    assert sorted((t.params["optim.lr"], t.params["optim.weight_decay"]) for t in done) == sorted(
        (lr, wd) for lr in (0.003, 1e-9) for wd in (0.0001, 0.001))  # each point once: none lost, none twice
    workers = {t.user_attrs["run_dir"] for t in done}
    assert len(workers) == 4
    pruned = [t for t in done if t.state.name == "PRUNED"]
    complete = [t for t in done if t.state.name == "COMPLETE"]
    # Both weak trials start after a good one finished, so they meet a better value at the rung (epoch 1)
    # and are pruned there. (The second good trial may be pruned too if the first reported a lower loss.)
    assert {t.number for t in done if t.params["optim.lr"] == 1e-9} <= {t.number for t in pruned}
    assert complete and all(t.params["optim.lr"] == 0.003 for t in complete)
    assert all(len(t.user_attrs["history"]["val_loss"]) == 1 for t in pruned)  # stopped after epoch 1 of 2
    assert all(len(t.user_attrs["history"]["val_loss"]) == 2 for t in complete)
    for t in done:  # each trial is an ordinary run directory, trained once
        run_dir = Path(t.user_attrs["run_dir"].split(":", 1)[1])
        with open(run_dir / "metrics.csv") as fh:
            epochs = [int(r["epoch"]) for r in csv.DictReader(fh)]
        assert epochs == list(range(1, len(t.user_attrs["history"]["val_loss"]) + 1))
        assert (run_dir / "config.yaml").is_file() and not (run_dir / "last.pt").exists()


def test_report_shows_pruned_trials_cost_fewer_epochs(pruned_sweep, tmp_path, capsys):
    sweep_dir, _ = pruned_sweep
    assert main_rc("sweep", "report", str(sweep_dir), "--out", str(tmp_path / "rep")) == 0
    with open(tmp_path / "rep" / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {"number", "state", "optim.lr", "optim.weight_decay", "final_val_acc", "best_val_acc", "final_val_loss",
            "best_val_loss", "epochs", "seconds"} <= set(rows[0])
    epochs = {}
    for r in rows:
        epochs.setdefault(r["state"], []).append(int(r["epochs"]))
    assert max(epochs["PRUNED"]) < min(epochs["COMPLETE"])  # pruned trials cost fewer epochs
    for name in ("curves", "params", "parallel"):
        assert (tmp_path / "rep" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    capsys.readouterr()
    assert main_rc("sweep", "best", str(sweep_dir)) == 0
    cfg_file = tmp_path / "best.yaml"
    cfg_file.write_text(capsys.readouterr().out)
    cfg = load_config(cfg_file)  # a runnable config for `cifarlab train`
    best = open_study(sweep_dir).study.best_trial
    assert cfg.optim.lr == best.params["optim.lr"] == 0.003
    assert cfg.optim.weight_decay == best.params["optim.weight_decay"]
    assert main_rc("sweep", "narrow", str(sweep_dir), "--top", "2", "-o", str(tmp_path / "n2.yaml")) == 0
    n2 = yaml.safe_load((tmp_path / "n2.yaml").read_text())
    assert n2["parameters"]["optim.lr"] == {"values": [0.003]}  # only 3e-3 trials completed
    # the narrowed file is itself a sweep that runs
    assert run_sweep(tmp_path / "n2.yaml", trials=1, out=tmp_path / "stage2", quiet=True)["counted"] == 1


def known_study(tmp_path) -> Path:
    """A study written trial by trial with known values (no training), as `sweep run` would store it."""
    from cifarlab.config import RunConfig
    from cifarlab.sweep import parse_sweep
    from cifarlab.sweep.spec import _encode

    raw = {"name": "known", "method": "random", "metric": {"name": "val_acc", "goal": "maximize"}, "run_cap": 8,
           "early_terminate": {"type": "hyperband", "min_iter": 1},
           "parameters": {"optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
                          "model.hidden": {"min": 8, "max": 64},
                          "model.widths": {"values": [[8, 16, 16], [16, 32, 32], [32, 64, 64]]},
                          "model.dropout": {"distribution": "q_uniform", "min": 0.0, "max": 0.5, "q": 0.1}}}
    spec = parse_sweep(raw, RunConfig().validate().to_dict())
    sweep_dir = tmp_path / "known"
    sweep_dir.mkdir()
    url = f"sqlite:///{sweep_dir / 'study.db'}"
    (sweep_dir / "study.json").write_text(json.dumps({"study": "known", "storage": url}))
    study = optuna.create_study(study_name="known", storage=open_storage(url), direction="maximize")
    study.set_user_attr("sweep", json.loads(json.dumps(spec.raw)))
    trials = [  # lr, hidden, widths, dropout, val_acc per epoch, state
        (0.001, 32, [16, 32, 32], 0.2, [0.30, 0.45, 0.50], "COMPLETE"),
        (0.003, 48, [32, 64, 64], 0.3, [0.35, 0.50, 0.60], "COMPLETE"),
        (0.0002, 12, [8, 16, 16], 0.0, [0.20, 0.25, 0.28], "COMPLETE"),
        (0.01, 60, [32, 64, 64], 0.1, [0.32, 0.48, 0.55], "COMPLETE"),
        (0.05, 20, [8, 16, 16], 0.5, [0.10, 0.12, 0.15], "COMPLETE"),
        (0.0005, 40, [16, 32, 32], 0.4, [0.25, 0.40, 0.42], "COMPLETE"),
        (0.08, 8, [8, 16, 16], 0.0, [0.10], "PRUNED"),
        (0.02, 16, [16, 32, 32], 0.2, [], "FAIL"),
    ]
    for lr, hidden, widths, dropout, accs, state in trials:
        values = {"optim.lr": lr, "model.hidden": hidden, "model.widths": widths, "model.dropout": dropout}
        study.enqueue_trial({k: _encode(v) for k, v in values.items()})
        t = study.ask()
        assert {p.name: p.suggest(t) for p in spec.params} == values
        t.set_user_attr("history", {"val_acc": accs, "val_loss": [2.5 - a for a in accs],
                                    "train_acc": accs, "train_loss": accs, "seconds": [1.5] * len(accs)})
        for epoch, a in enumerate(accs, 1):
            t.report(a, epoch)
        if state == "FAIL":
            t.set_user_attr("error", "non-finite loss in epoch 1")
        study.tell(t, accs[-1] if state == "COMPLETE" else None, state=getattr(optuna.trial.TrialState, state))
    return sweep_dir


def test_narrow_report_best_on_a_known_study(tmp_path, capsys):
    sweep_dir = known_study(tmp_path)
    s = open_study(sweep_dir)
    text, raw = narrow(s, top=3)  # the 3 best: trials 1 (0.60), 3 (0.55), 0 (0.50)
    assert raw["parameters"] == {
        "optim.lr": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.01},
        "model.hidden": {"distribution": "int_uniform", "min": 32, "max": 60},
        "model.widths": {"values": [[16, 32, 32], [32, 64, 64]]},
        "model.dropout": {"distribution": "q_uniform", "min": 0.1, "max": 0.3, "q": 0.1},
    }
    assert raw["cifarlab"]["config"] == s.base and raw["early_terminate"] == {"type": "hyperband", "min_iter": 1}
    assert "best trial(s) (1, 3, 0)" in text.splitlines()[0]
    stage2 = yaml.safe_load(text)
    from cifarlab.sweep import parse_sweep

    spec2 = parse_sweep(stage2, stage2["cifarlab"]["config"])  # a valid sweep file in its own right
    assert [p.name for p in spec2.params] == [p.name for p in s.spec.params]

    cfg_text = best_config_yaml(s)
    assert cfg_text.startswith("# Best trial 1 of sweep study known: val_acc = 0.6000")
    cfg = yaml.safe_load(cfg_text)
    assert (cfg["optim"]["lr"], cfg["model"]["hidden"], cfg["model"]["widths"], cfg["model"]["dropout"]) == (
        0.003, 48, [32, 64, 64], 0.3)

    assert main_rc("sweep", "report", str(sweep_dir)) == 0
    report = sweep_dir / "report"
    with open(report / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["state"] for r in rows] == ["COMPLETE"] * 6 + ["PRUNED", "FAIL"]
    r1 = rows[1]
    assert (r1["model.widths"], r1["epochs"], r1["final_val_acc"], r1["best_val_acc"]) == ("[32, 64, 64]", "3", "0.6",
                                                                                           "0.6")
    assert float(r1["final_val_loss"]) == pytest.approx(1.9) and float(r1["best_val_loss"]) == pytest.approx(1.9)
    assert rows[6]["epochs"] == "1" and rows[7]["note"] == "error: non-finite loss in epoch 1"
    assert [r["counted"] for r in rows] == ["True"] * 8
    for name in ("curves", "params", "parallel", "importance"):
        assert (report / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    with pytest.raises(ConfigError, match="--top"):
        narrow(s, top=0)


def main_rc(*argv) -> int:
    try:
        main(list(argv))
    except SystemExit as e:
        return e.code or 0
    return 0


def test_dead_worker_trial_fails_and_runs_again(small_folder, tmp_path):
    f = write_sweep(tmp_path / "s.yaml", name="dead", method="random", metric={"name": "val_acc", "goal": "maximize"},
                    parameters={"optim.lr": {"values": [0.003, 0.001]}, "model.hidden": {"values": [16, 32]}})
    kw = dict(out=tmp_path, heartbeat=1, quiet=True, overrides=tiny(small_folder, **{"train.epochs": 1}))
    run_sweep(f, trials=2, **kw)
    sweep_dir = tmp_path / "dead"
    s = open_study(sweep_dir)
    before = {t.number: t.value for t in s.study.get_trials()}
    assert len(before) == 2

    # What a killed worker leaves behind: a RUNNING trial, with drawn parameters, whose heartbeat stopped.
    url = json.loads((sweep_dir / "study.json").read_text())["storage"]
    store = open_storage(url, heartbeat=1)
    study = optuna.load_study(study_name="dead", storage=store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize": not here
        t = study.ask()
    params = {p.name: p.suggest(t) for p in s.spec.params}
    store.record_heartbeat(t._trial_id)

    summary = run_sweep(f, trials=4, **kw)
    trials = {x.number: x for x in study.get_trials()}
    assert trials[t.number].state.name == "FAIL" and not counted(trials[t.number])
    retry = [x for x in trials.values() if x.system_attrs.get("failed_trial") == t.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == params
    assert summary["counted"] == 4
    assert {n: trials[n].value for n in before} == before  # finished trials kept as they were


def _fit_with(after_epoch, calls: list):
    """cifarlab.train.fit whose on_epoch_end then calls ``after_epoch(trial, epoch)``, trials counted from 1."""
    import cifarlab.train

    real_fit = cifarlab.train.fit

    def fit(cfg, out, name, **kw):
        user_cb = kw.pop("on_epoch_end")
        calls.append(name)

        def cb(epoch, row):
            user_cb(epoch, row)
            after_epoch(len(calls), epoch)

        return real_fit(cfg, out, name, on_epoch_end=cb, **kw)

    return fit


def test_interrupt_queues_the_running_trial_and_rerun_finishes(small_folder, tmp_path, monkeypatch):
    import cifarlab.train

    real_fit = cifarlab.train.fit

    def ctrl_c(trial, epoch):
        if trial == 2 and epoch == 1:  # Ctrl-C during the second trial
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(cifarlab.train, "fit", _fit_with(ctrl_c, []))
    f = write_sweep(tmp_path / "s.yaml", name="intr", method="random", run_cap=3,
                    parameters={"optim.lr": {"values": [0.003, 0.001]}})
    kw = dict(out=tmp_path, heartbeat=1, quiet=True, overrides=tiny(small_folder, **{"train.epochs": 2}))
    with pytest.raises(SweepInterrupted) as e:
        run_sweep(f, **kw)
    assert e.value.exit_code == 130
    s = open_study(tmp_path / "intr")
    trials = s.study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]
    assert "interrupted" in trials[1].user_attrs and trials[2].params == trials[1].params

    monkeypatch.setattr(cifarlab.train, "fit", real_fit)
    summary = run_sweep(f, **kw)
    trials = s.study.get_trials()
    assert summary["counted"] == 3 and trials[2].state.name == "COMPLETE"
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


@pytest.mark.parametrize("then", ["finish", "prune"])
def test_a_stop_as_a_trial_ends_keeps_its_result_and_stops_the_worker(small_folder, tmp_path, monkeypatch, then):
    """Ctrl-C after the second trial's last step (it finishes and is written) or as it is pruned: the trial is
    recorded as it ended, not queued to run again, and the sweep stops; a rerun goes on with the next trial."""
    import cifarlab.train

    real_fit = cifarlab.train.fit
    calls = []

    def ctrl_c(trial, epoch):
        if trial == 2 and epoch == (2 if then == "finish" else 1):
            os.kill(os.getpid(), signal.SIGINT)
            if then == "prune":
                raise optuna.TrialPruned(f"pruned after epoch {epoch}/2")

    monkeypatch.setattr(cifarlab.train, "fit", _fit_with(ctrl_c, calls))
    f = write_sweep(tmp_path / "s.yaml", name="late", method="random", run_cap=3,
                    parameters={"optim.lr": {"values": [0.003, 0.001]}})
    kw = dict(out=tmp_path, heartbeat=1, quiet=True, overrides=tiny(small_folder, **{"train.epochs": 2}))
    with pytest.raises(SweepInterrupted):
        run_sweep(f, **kw)
    trials = open_study(tmp_path / "late").study.get_trials()
    ended = "COMPLETE" if then == "finish" else "PRUNED"
    assert [t.state.name for t in trials] == ["COMPLETE", ended]  # nothing queued to run the trial again
    assert "interrupted" not in trials[1].user_attrs and len(trials[1].user_attrs["history"]["val_acc"]) == \
        (2 if then == "finish" else 1)

    monkeypatch.setattr(cifarlab.train, "fit", real_fit)
    summary = run_sweep(f, **kw)
    assert summary["counted"] == 3 and len(calls) == 2
    assert [t.state.name for t in open_study(tmp_path / "late").study.get_trials()] == ["COMPLETE", ended, "COMPLETE"]


def test_failing_trial_counts_and_is_reported(small_folder, tmp_path):
    """A value the model rejects only in combination fails that trial, with its message, and uses its place."""
    f = write_sweep(tmp_path / "s.yaml", name="bad", method="grid",
                    parameters={"model.widths": {"values": [[8, 16, 16], [8, 16, 0]]}})
    with pytest.raises(ConfigError, match="model.widths"):  # a zero width is refused before any trial
        run_sweep(f, out=tmp_path, quiet=True, overrides=tiny(small_folder, **{"train.epochs": 1}))
    f = write_sweep(tmp_path / "s2.yaml", name="nan", method="grid",
                    parameters={"optim.lr": {"values": [0.003, 1.0e30]}})  # diverges: non-finite loss
    summary = run_sweep(f, out=tmp_path, quiet=True, overrides=tiny(small_folder, **{"train.epochs": 1}))
    s = open_study(tmp_path / "nan")
    failed = [t for t in s.study.get_trials() if t.state.name == "FAIL"]
    assert summary["counted"] == 2 and len(failed) == 1 and "non-finite" in failed[0].user_attrs["error"]


def test_wandb_offline_logging(small_folder, tmp_path, monkeypatch):
    """Each trial is a W&B run, logged through cifarlab.trackers by the real library in offline mode (no
    network): under the sweep directory, grouped by study, with the drawn values, every epoch and the state
    the trial ended in; read back from the offline run files."""
    from .test_trackers import _wandb_history, wandb_file_records

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_PROJECT", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    f = write_sweep(tmp_path / "s.yaml", name="wb", method="grid",  # the second diverges: a failed trial
                    parameters={"optim.lr": {"values": [0.003, 1.0e30]}})
    summary = run_sweep(f, out=tmp_path, wandb=True, quiet=True,
                        overrides=tiny(small_folder, **{"train.epochs": 2}))
    assert summary["states"] == {"COMPLETE": 1, "FAIL": 1}
    runs = {}
    for run_file in sorted((Path(summary["sweep_dir"]) / "wandb").glob("offline-run-*/run-*.wandb")):
        records = wandb_file_records(run_file)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        summary_items = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
                         for i in r.summary.update}
        (exit_code,) = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
        runs[config["sweep_params"]["optim.lr"]] = (run, config, summary_items, exit_code, _wandb_history(records))
    assert set(runs) == {0.003, 1.0e30}
    for run, config, _, _, _ in runs.values():
        assert (run.project, run.run_group, run.job_type) == ("wb", "wb", "sweep-trial")
        assert run.display_name in ("trial-0000", "trial-0001") and config["optim"]["lr"] in runs
    _, _, state, exit_code, history = runs[0.003]
    assert state["trial_state"] == "complete" and exit_code == 0
    assert [h["epoch"] for h in history if "val_acc" in h] == [1, 2]
    _, _, state, exit_code, _ = runs[1.0e30]
    assert state["trial_state"] == "failed" and exit_code == 1
    assert not (home / "wandb_dir").exists() or not any((home / "wandb_dir").rglob("*.wandb"))


def test_rerun_with_another_sweep_under_the_same_name_is_refused(small_folder, tmp_path):
    f = write_sweep(tmp_path / "s.yaml", name="same", method="random", run_cap=1,
                    parameters={"optim.lr": {"values": [0.003]}})
    kw = dict(out=tmp_path, quiet=True, overrides=tiny(small_folder, **{"train.epochs": 1}))
    run_sweep(f, **kw)
    assert run_sweep(f, **kw)["counted"] == 1  # nothing left to do: no new trial
    write_sweep(f, name="same", method="random", run_cap=1, parameters={"optim.lr": {"values": [0.001]}})
    with pytest.raises(Exception, match="different sweep.*parameters"):
        run_sweep(f, **kw)


def test_budget_gate_turns_away_a_trial_beyond_the_budget(tmp_path):
    """Two workers start trials at once with one place left: the later-numbered trial must not run."""
    from cifarlab.config import RunConfig
    from cifarlab.sweep import parse_sweep
    from cifarlab.sweep.objective import Objective, Worker, _OverBudget

    spec = parse_sweep({"method": "random", "parameters": {"optim.lr": {"values": [0.1]}}},
                       RunConfig().validate().to_dict())
    url = f"sqlite:///{tmp_path / 'gate.db'}"
    study = optuna.create_study(study_name="gate", storage=open_storage(url), direction="maximize")
    first, second = study.ask(), study.ask()  # both RUNNING, as two workers would hold them
    run = Worker(spec=spec, base={}, storage=url, study="gate", sweep_dir=str(tmp_path), budget=1, quiet=True)
    with pytest.raises(_OverBudget):
        Objective(run, study)(second)
    assert "skipped" in study.get_trials()[second.number].user_attrs
    assert "skipped" not in study.get_trials()[first.number].user_attrs


def test_claiming_takes_stop_signals_whatever_was_inherited():
    """A script's background job starts with SIGINT ignored; while a worker claims trials, SIGINT and SIGTERM
    still raise KeyboardInterrupt (a stop fit hands back after a trial's last step is not dropped), and the
    inherited handlers are put back afterwards."""
    from cifarlab.sweep.claims import stop_signals

    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with stop_signals():
            for s in (signal.SIGINT, signal.SIGTERM):
                with pytest.raises(KeyboardInterrupt):
                    signal.raise_signal(s)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in old)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
