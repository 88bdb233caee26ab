"""Randomized fault test: SIGKILL real cifarlab processes at moments drawn over their whole life, then go on
as a user would, and check that nothing was lost, counted twice or left half-written.

- ``train``: several runs ("lanes"), each with its own draw of the checkpoint interval, a cold private
  cache on some, one to three kills at moments drawn uniformly over the life of an uninterrupted run
  (interpreter start, data decode and cache write, run directory creation, steps, checkpoint writes,
  validation, summary), each followed by ``train --resume`` (or, when the kill came before the run wrote
  its first file, the same command again). Each lane must end with the uninterrupted run's metrics.csv (its
  wall-clock ``seconds`` column aside: it times each epoch and differs between any two runs) and its best
  weights, bit for bit. Lanes are added until at least 8 kills landed.
- ``sweep run``: a random worker (or, before the workers exist, ``sweep run`` itself) is killed at a random
  moment; running the sweep again ends the study with exactly its budget of counted trials.
- ``evaluate`` / ``report``: killed at random moments; every file they leave is whole, and the commands run
  again give the uninterrupted results.

The moments drawn and what each kill left are printed (past pytest's capture). The seed is new on every
run and printed; ``CIFARLAB_CHAOS_SEED=N`` replays one. benchmarks/chaos.py is the long version and holds
the shared functions.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from .conftest import REPO, make_subset

pytestmark = pytest.mark.slow


def _load_chaos():
    spec = importlib.util.spec_from_file_location("cifarlab_chaos", REPO / "benchmarks" / "chaos.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


chaos = _load_chaos()
SEED = int(os.environ.get("CIFARLAB_CHAOS_SEED") or random.SystemRandom().randrange(10**6))
MIN_TRAIN_KILLS = 8
EPOCHS = {"train.epochs": 5}  # about half of a process's life is training (the rest: start-up, decode, exit)


@pytest.fixture()
def say(capsys):
    """Print to the terminal even under pytest's capture: the kill moments belong in the CI log."""

    def say_(line: str) -> None:
        with capsys.disabled():
            print(line, flush=True)

    return say_


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")]


# --------------------------------------------------------------------------- train
def test_random_kills_of_training_then_resume_give_the_uninterrupted_run(tmp_path, say):
    data = make_subset(tmp_path / "data", 50, 10)
    runs, log = tmp_path / "runs", tmp_path / "log.txt"
    warm = tmp_path / "cache-warm"
    # Two uninterrupted runs side by side, as the lanes run below: their mean life (cold cache) is the window
    # the kill moments are drawn from, and they must agree with each other too.
    with ThreadPoolExecutor(max_workers=2) as pool:
        lives = list(pool.map(lambda n: chaos.run_to_end(chaos.train_command(data, runs, n, 4, **EPOCHS),
                                                         chaos.env_with(tmp_path / f"cache-{n}"), log),
                              ["clean", "clean2"]))
    life = sum(lives) / 2
    assert chaos.same_result(runs / "clean", runs / "clean2") == []
    shutil.copytree(tmp_path / "cache-clean", warm)
    say(f"\n[chaos train] seed {SEED} (CIFARLAB_CHAOS_SEED={SEED} replays it); two uninterrupted runs side by side "
        f"{lives[0]:.1f} s and {lives[1]:.1f} s from start to exit on a cold cache: kill moments drawn from "
        f"[0, {life:.1f}) s")

    def lane(i: int) -> tuple[list[str], int, list[str], int]:
        rng = random.Random(SEED * 1000 + i)
        every = rng.choice([1, 2, 3, 5])
        cold = rng.random() < 0.4
        kills = rng.choice([1, 1, 2, 3])  # some draws repeat the kill on the resumed process
        cache = tmp_path / f"cache-{i}" if cold else warm
        lines = [f"lane {i}: checkpoint every {every} steps, {kills} kill(s) planned, "
                 f"{'cold private' if cold else 'warm'} cache"]
        name = f"lane{i}"
        cycle = chaos.chaos_cycle(chaos.train_command(data, runs, name, every, **EPOCHS), runs / name, chaos.env_with(cache),
                                  lambda: rng.uniform(0, life), kills, log, lines.append, cold=cold)
        diffs = chaos.same_result(runs / name, runs / "clean")
        lines.append(f"  -> {'same run as the uninterrupted one' if not diffs else 'DIFFERS: ' + ', '.join(diffs)}")
        left = [str(p.relative_to(tmp_path)) for p in _temp_files(runs / name)]
        cache_tmp = len(list(cache.rglob("*.tmp"))) if cold else 0
        if cache_tmp:
            lines.append(f"  (cache: {cache_tmp} temp file(s) of a cut cache write left in {cache.name})")
        return lines, len(cycle.kills), diffs + left, cache_tmp

    total, lanes, failures = 0, 0, []
    with ThreadPoolExecutor(max_workers=2) as pool:  # two lanes at a time: one process per core
        while total < MIN_TRAIN_KILLS or lanes < 4:
            assert lanes < 16, f"only {total} kills landed in {lanes} lanes"
            for lines, kills, bad, _ in pool.map(lane, [lanes, lanes + 1]):
                for line in lines:
                    say(line)
                total += kills
                failures += bad
            lanes += 2
    say(f"[chaos train] {total} kills in {lanes} lanes")
    assert failures == []
    assert total >= MIN_TRAIN_KILLS


# --------------------------------------------------------------------------- sweep run
def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _sweep_workers(pid: int) -> list[int]:
    """The sweep's worker processes (spawned children; not multiprocessing's resource tracker)."""
    out = []
    for c in _children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes():
                out.append(c)
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_random_kill_of_a_sweep_worker_keeps_the_trial_budget(tmp_path, say):
    from cifarlab.sweep import open_study
    from cifarlab.sweep.storage import counted

    data = make_subset(tmp_path / "data", 20, 5)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "chaos", "method": "random", "metric": {"name": "val_acc", "goal": "maximize"},
                                 "parameters": {"optim.lr": {"distribution": "log_uniform_values",
                                                             "min": 0.0003, "max": 0.01}}}))
    sets = {"data.path": data, "data.train_size": 160, "data.val_size": 40, "train.epochs": 2, "train.batch_size": 16,
            "train.val_every": 1, "train.precision": "fp32", "train.device": "cpu", "model.widths": "[8, 16, 16]",
            "model.hidden": 16}
    budget = 3
    env = chaos.env_with(tmp_path / "cache")

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "cifarlab", "sweep", "run", str(f), "--out", str(out), "--heartbeat", "1",
                "--workers", "2", "--trials", str(budget), "--seed", "0",
                *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]

    log = tmp_path / "sweep.log"
    life = chaos.run_to_end(cmd(tmp_path / "clean"), env, log)
    say(f"\n[chaos sweep] seed {SEED}; an uninterrupted sweep of {budget} trials on 2 workers: {life:.1f} s")
    rng = random.Random(SEED + 7)
    for draw in range(2):
        out = tmp_path / f"s{draw}"
        moment = rng.uniform(0, life)
        with open(log, "ab") as lf:
            proc = subprocess.Popen(cmd(out), env=env, stdout=lf, stderr=subprocess.STDOUT)
            t0 = time.monotonic()
            orphans: list[int] = []
            try:
                proc.wait(timeout=moment)
                say(f"draw {draw}: {moment:5.2f} s: the sweep ended first")
            except subprocess.TimeoutExpired:
                workers = _sweep_workers(proc.pid)
                victim = rng.choice(workers) if workers else proc.pid
                os.kill(victim, signal.SIGKILL)
                at = time.monotonic() - t0
                if victim == proc.pid:
                    orphans = _sweep_workers(proc.pid)
                    what = "sweep run itself (no worker yet)"
                else:
                    what = f"worker {workers.index(victim)} of {len(workers)}"
                time.sleep(0.2)
                running, done = {}, []
                if (out / "chaos" / "study.json").is_file():
                    trials = open_study(out / "chaos").study.get_trials()
                    running = {t.number: t.user_attrs.get("worker", "?").rsplit(":", 1)[-1] for t in trials
                               if t.state.name == "RUNNING"}
                    done = sorted(t.number for t in trials if counted(t))
                mine = [n for n, pid in running.items() if pid == str(victim)]
                say(f"draw {draw}: kill at {at:5.2f} s of {what} (pid {victim}): "
                    f"{'in trial ' + str(mine[0]) if mine else 'in no trial'}; running trials (pid) {running}, "
                    f"counted so far {done}")
                proc.wait(timeout=900)  # a deadlock guard
            finally:
                if proc.poll() is None:
                    proc.kill()
        deadline = time.monotonic() + 120
        while any(map(_alive, orphans)) and time.monotonic() < deadline:
            time.sleep(0.2)  # a killed `sweep run`'s workers stop at their next check
        for p in orphans:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        before = {}
        if (out / "chaos" / "study.json").is_file():
            before = {t.number: t.value for t in open_study(out / "chaos").study.get_trials()
                      if t.state.name == "COMPLETE"}
        chaos.run_to_end(cmd(out), env, log)  # as a user would: the same command again finishes the study
        trials = {t.number: t for t in open_study(out / "chaos").study.get_trials()}
        n_counted = sum(map(counted, trials.values()))
        say(f"draw {draw}: after the rerun: {n_counted} of {budget} counted; states "
            f"{sorted((n, t.state.name) for n, t in trials.items())}")
        assert n_counted == budget
        for t in trials.values():  # a retry counts only where the trial it retries does not
            src = t.system_attrs.get("failed_trial")
            if src is not None and counted(t):
                assert not counted(trials[src]), f"trial {t.number} and the trial it retries, {src}, both count"
        assert all(trials[n].state.name == "COMPLETE" and trials[n].value == v for n, v in before.items())
        for t in trials.values():
            if t.state.name == "COMPLETE":
                run = Path(t.user_attrs["run_dir"].split(":", 1)[1])
                assert (run / "best.safetensors").is_file() and len(chaos.metrics_rows(run)) == 2


# --------------------------------------------------------------------------- evaluate / report
def _assert_whole(folder: Path) -> list[str]:
    """Every file a later command could read opens whole; returns the names checked."""
    from PIL import Image
    from safetensors.torch import load_file

    from cifarlab.train.checkpoint import load_checkpoint

    checked = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or (p.name.startswith(".") and p.name.endswith(".tmp")):
            continue  # temp files of cut writes: never read, removed by the next write
        s = p.suffix
        if s == ".json":
            json.loads(p.read_text())
        elif s == ".npz":
            with np.load(p, allow_pickle=False) as z:
                [z[k] for k in z.files]
        elif s == ".csv":
            list(csv.reader(p.open()))
        elif s == ".png":
            with Image.open(p) as im:
                im.load()
        elif s == ".html":
            assert p.read_text().rstrip().endswith("</html>"), f"{p} is cut short"
        elif s == ".safetensors":
            load_file(str(p))
        elif s == ".pt":
            load_checkpoint(p)
        elif s == ".yaml":
            yaml.safe_load(p.read_text())
        checked.append(str(p.relative_to(folder)))
    return checked


def test_random_kills_of_evaluate_and_report_leave_no_half_written_file(trained_run, tmp_path, say):
    env = chaos.env_with(tmp_path / "cache")
    log = tmp_path / "log.txt"
    py = [sys.executable, "-m", "cifarlab"]

    def fresh(name: str) -> Path:
        run = tmp_path / name
        shutil.copytree(trained_run, run)
        for p in ("test_metrics.json", "test_logits.npz"):
            (run / p).unlink(missing_ok=True)
        shutil.rmtree(run / "report", ignore_errors=True)
        return run

    clean = fresh("clean")
    t_eval = chaos.run_to_end([*py, "evaluate", str(clean)], env, log)
    t_report = chaos.run_to_end([*py, "report", str(clean)], env, log)
    say(f"\n[chaos evaluate/report] seed {SEED}; uninterrupted: evaluate {t_eval:.1f} s, report {t_report:.1f} s")
    rng = random.Random(SEED + 11)
    kills = 0
    for draw in range(2):
        run = fresh(f"run{draw}")
        for verb, life in (("evaluate", t_eval), ("report", t_report)):
            moment = rng.uniform(0, life)
            killed, rc = chaos.start_and_kill([*py, verb, str(run)], env, moment, log)
            kills += killed
            files = _assert_whole(run)  # a later evaluate / report / compare reads these
            written = [f for f in files if f.startswith(("test_", "report"))]
            say(f"draw {draw}: {verb} {'killed' if killed else 'ended (rc ' + str(rc) + ') before'} at {moment:5.2f} "
                f"s; left whole: {', '.join(written) or 'no file of its own yet'}")
            assert killed or rc == 0
        chaos.run_to_end([*py, "evaluate", str(run)], env, log)
        chaos.run_to_end([*py, "report", str(run)], env, log)
        assert json.loads((run / "test_metrics.json").read_text()) == json.loads((clean / "test_metrics.json").read_text())
        with np.load(run / "test_logits.npz") as a, np.load(clean / "test_logits.npz") as b:
            assert all(np.array_equal(a[k], b[k]) for k in b.files)
        named = {"run", "run_dir"}  # the run's own name and folder
        ra, rb = (json.loads((r / "report" / "metrics.json").read_text()) for r in (run, clean))
        assert {k: v for k, v in ra.items() if k not in named} == {k: v for k, v in rb.items() if k not in named}
        assert sorted(p.name for p in (run / "report").iterdir()) == sorted(p.name for p in (clean / "report").iterdir())
    say(f"[chaos evaluate/report] {kills} kills")
