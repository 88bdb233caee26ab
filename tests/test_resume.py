"""Kill a training run at any point, resume it, and get the very run that was never interrupted.

The comparison is bit for bit: every batch draws its shuffling, augmentation and
dropout from generators seeded by (seed, epoch, step), and the checkpoint holds the
model, optimizer, scheduler, EMA, partial epoch sums and RNG states, so a resumed
run replays exactly the same float operations on the CPU. Only wall-clock numbers
(the ``seconds`` column, ``train_seconds``, ``images_per_second``) differ, and the
bytes of ``best.safetensors``: safetensors writes its metadata map in a random
order, so its tensors are compared instead of its bytes.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cifarlab.cli.main import main
from cifarlab.train.checkpoint import load_checkpoint, save_checkpoint

from . import pause
from .conftest import REPO, tiny_overrides, tiny_set_args
from .interrupts import ctrl_c_at

# Dropout (cnn's classifier), the study's augmentation, an EMA, a lookahead and a per-step schedule with warm-up:
# every piece of state a resume has to restore.
RESUME_SETTINGS = {"train.epochs": 4, "train.batch_size": 8, "data.augment_p": 0.5, "train.ema": 0.9,
                   "train.lookahead": 0.9, "train.lookahead_every": 3,
                   "optim.schedule": "cosine", "optim.warmup_epochs": 0.5, "train.val_every": 1,
                   "train.log_every": 5}


def _sets(data: Path, **extra) -> list[str]:
    return tiny_set_args(data, **{**RESUME_SETTINGS, **extra})


def _cli(*args: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(run / "metrics.csv"))]


def assert_same_run(a: Path, b: Path, summary_aside: frozenset[str] = frozenset()) -> None:
    """Two run directories hold the same training result, bit for bit, wall-clock numbers (and the summary's
    ``summary_aside`` keys) aside."""
    assert _metrics(a) == _metrics(b)
    wa, wb = load_file(a / "best.safetensors"), load_file(b / "best.safetensors")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"best.safetensors: {k} differs"
    assert json.loads((a / "best.json").read_text()) == json.loads((b / "best.json").read_text())
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["ema_updates"] == cb["ema_updates"]
    for part in ("model", "ema", "lookahead"):
        assert (ca[part] is None) == (cb[part] is None)
        if ca[part] is None:
            continue
        assert sorted(ca[part]) == sorted(cb[part])
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), f"last.pt {part}: {k} differs"
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sorted(sa) == sorted(sb)
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state {i}.{k} differs"
    assert ca["scheduler"] == cb["scheduler"]
    ta, tb = dict(ca["train_state"]), dict(cb["train_state"])
    for t in (ta, tb):
        t.pop("train_seconds")
        t.pop("wall_seconds", None)  # the clock, like train_seconds
        for row in t["history"]:
            row.pop("seconds")
    assert ta == tb
    clock = {"train_seconds", "images_per_second", "wall_seconds", "run_dir", *summary_aside}
    sa_, sb_ = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert {k: v for k, v in sa_.items() if k not in clock} == {k: v for k, v in sb_.items() if k not in clock}


# --------------------------------------------------------------------------- subprocess: SIGKILL, SIGTERM
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _popen(args: list[str], err: Path, pause_at: str | None = None) -> subprocess.Popen:
    """``cifarlab ARGS``; with ``pause_at`` (tests/pause.py: ``GLOB@checkpoint=E.S``), held once that checkpoint is
    written, until the test kills it or lets it go on."""
    if pause_at is None:
        return subprocess.Popen([sys.executable, "-m", "cifarlab", *args], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=open(err, "w"))
    return subprocess.Popen(pause.command(*args), env=pause.env(err.with_suffix(".ctrl"), [pause_at], ENV),
                            stdout=subprocess.DEVNULL, stderr=open(err, "w"))


def test_sigkill_then_sigterm_then_resume_matches_an_uninterrupted_run(small_folder, tmp_path):
    base = ["train", "--config", str(REPO / "configs/cnn.yaml"), "--out", str(tmp_path), *_sets(small_folder),
            "--set", "train.num_threads=1", "--checkpoint-every-steps", "4"]
    # The reference run goes alongside the interrupted one (two cores or more make this test faster).
    clean = _popen([*base, "--name", "clean"], tmp_path / "clean.err")
    run = tmp_path / "run"
    try:
        # 1. SIGKILL in the middle of the second epoch, held just after its first checkpoint there: no handler runs,
        # only the files on disk survive.
        err = tmp_path / "killed.err"
        proc = _popen([*base, "--name", "run"], err, pause_at=f"{run}@checkpoint=1.1")
        pause.wait_paused(err.with_suffix(".ctrl"), 0, proc, err)
        proc.kill()
        assert proc.wait(timeout=pause.GUARD) == -signal.SIGKILL
        killed = load_checkpoint(run / "last.pt")
        assert killed["train_state"]["epoch"] == 1 and 0 < killed["train_state"]["step"] <= 4
        assert len(_metrics(run)) == killed["train_state"]["epoch"]  # metrics.csv matches the checkpoint
        (run / ".last.pt.cut-short.tmp").write_bytes(b"PK\x03")  # what a kill in the middle of a write leaves

        # 2. Resume, then SIGTERM (held after its first checkpoint): the current step finishes, a checkpoint is
        # written, the exit says how to resume.
        err = tmp_path / "term.err"
        st = killed["train_state"]
        proc = _popen(["train", "--resume", str(run)], err, pause_at=f"{run}@checkpoint={st['epoch']}.{st['step'] + 1}")
        pause.wait_paused(err.with_suffix(".ctrl"), 0, proc, err)
        held = load_checkpoint(run / "last.pt")["train_state"]
        assert held["global_step"] > st["global_step"]
        proc.send_signal(signal.SIGTERM)
        pause.release(err.with_suffix(".ctrl"), 0)
        assert proc.wait(timeout=pause.GUARD) == 128 + signal.SIGTERM
        lines = err.read_text().strip().splitlines()
        assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], lines
        assert f"cifarlab train --resume {run}" in lines[0]
        termed = load_checkpoint(run / "last.pt")["train_state"]
        assert termed["global_step"] == held["global_step"] + 1 and 0 < termed["step"]  # the step after the signal
        assert f"at step {termed['step']};" in lines[0]  # the checkpoint is the step the message names

        # 3. Resume to the end.
        done = subprocess.run([sys.executable, "-m", "cifarlab", "train", "--resume", str(run)],
                              env=ENV, capture_output=True, text=True, timeout=pause.GUARD)
        assert done.returncode == 0, done.stderr
        assert f"resuming {run} at epoch {termed['epoch'] + 1}, step {termed['step']}" in done.stdout
        assert clean.wait(timeout=pause.GUARD) == 0, (tmp_path / "clean.err").read_text()
    finally:
        for p in (clean, proc):
            if p.poll() is None:
                p.kill()
    assert_same_run(run, tmp_path / "clean")
    assert not list(run.glob(".*.tmp")), "a temporary file of an interrupted write was left behind"


# --------------------------------------------------------------------------- in process: SIGINT at a chosen step
def test_sigint_mid_epoch_then_resume_is_bit_exact(small_folder, tmp_path, monkeypatch, capsys):
    """Ctrl-C at a known step (raised from inside the loop): exit 130, a checkpoint of that step, exact resume."""
    args = ["train", "--config", str(REPO / "configs/cnn.yaml"), "--out", str(tmp_path),
            *_sets(small_folder, **{"train.epochs": 3})]
    assert _cli(*args, "--name", "clean") == 0

    capsys.readouterr()
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest was started in the background
    with ctrl_c_at(monkeypatch, epoch=1, step=6):
        assert _cli(*args, "--name", "run") == 128 + signal.SIGINT
    err = capsys.readouterr().err.strip().splitlines()
    run = tmp_path / "run"
    assert err == [f"cifarlab: error: stopped by SIGINT in epoch 2 at step 7; checkpoint written. "
                   f"Resume with: cifarlab train --resume {run}"]
    st = load_checkpoint(run / "last.pt")["train_state"]
    assert (st["epoch"], st["step"]) == (1, 7)  # the step that was running finished, then the checkpoint
    assert st["epoch_seconds"] > 0  # the stopped epoch's seconds so far
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back

    # Say the stopped epoch had run 1000 s: those seconds count in the run's time after the resume
    # (train_seconds, and wall_seconds that a time budget reads), not only the resumed process's.
    ckpt = load_checkpoint(run / "last.pt")
    ckpt["train_state"]["epoch_seconds"] = 1000.0
    save_checkpoint(run / "last.pt", ckpt, keep_previous=False)
    assert _cli("train", "--resume", str(run)) == 0
    assert_same_run(run, tmp_path / "clean")
    end = load_checkpoint(run / "last.pt")["train_state"]
    assert end["history"][1]["seconds"] >= 1000 and end["history"][2]["seconds"] < 1000
    assert end["train_seconds"] >= st["train_seconds"] + 1000 and end["wall_seconds"] >= st["wall_seconds"] + 1000


def test_fp16_loss_scale_is_checkpointed_and_resumed(small_folder, tmp_path, monkeypatch, capsys):
    """fp16's loss scale is training state: a resume that started again from GradScaler's initial scale would
    skip again the overflowing steps the interrupted run had already skipped, and train another run. fp16 is a
    CUDA precision; the CPU's fp16 autocast and GradScaler stand in for it here, from a scale so large that the
    first steps overflow (as they do on a GPU from the default 65536 with larger losses)."""
    import functools

    import cifarlab.train.runtime as runtime

    monkeypatch.setattr(runtime, "resolve_precision", lambda precision, device: "fp16")
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**30))
    args = ["train", "--config", str(REPO / "configs/cnn.yaml"), "--out", str(tmp_path),
            *_sets(small_folder, **{"train.epochs": 2})]
    assert _cli(*args, "--name", "clean") == 0
    with ctrl_c_at(monkeypatch, epoch=0, step=20):
        assert _cli(*args, "--name", "run") == 128 + signal.SIGINT
    scaler = load_checkpoint(tmp_path / "run" / "last.pt")["scaler"]
    assert scaler["scale"] < 2.0**30  # overflowing steps were skipped and the scale came down
    assert _cli("train", "--resume", str(tmp_path / "run")) == 0
    assert_same_run(tmp_path / "run", tmp_path / "clean")


@pytest.mark.parametrize("then", ["finish", "prune"])
def test_a_stop_after_the_last_step_is_not_swallowed(small_folder, tmp_path, then):
    """SIGTERM after a run's last step (its validation, checkpoint, on_epoch_end) reaches the handler from
    before the run: once the finished run is written, or at once when on_epoch_end raises (a pruned trial), so a
    sweep worker stops instead of going on to its next trial."""
    from cifarlab.config import load_config
    from cifarlab.train import fit

    class Stopped(Exception):
        pass

    class Pruned(Exception):
        pass

    def outer(signum, frame):
        raise Stopped(signum)

    cfg = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder))
    at = cfg.train.epochs if then == "finish" else 1

    def on_epoch_end(epoch, row):
        if epoch == at:
            os.kill(os.getpid(), signal.SIGTERM)
            if then == "prune":
                raise Pruned

    old = signal.signal(signal.SIGTERM, outer)
    try:
        with pytest.raises(Stopped):
            fit(cfg, tmp_path, "run", quiet=True, on_epoch_end=on_epoch_end)
        assert signal.getsignal(signal.SIGTERM) is outer
    finally:
        signal.signal(signal.SIGTERM, old)
    assert (tmp_path / "run" / "summary.json").is_file() == (then == "finish")


def test_resume_of_a_finished_run_changes_nothing(trained_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.name not in ("summary.json", "config.yaml")}
    assert _cli("train", "--resume", str(run)) == 0
    after = {f.name: f.read_bytes() for f in run.iterdir() if f.name not in ("summary.json", "config.yaml")}
    assert after == before
