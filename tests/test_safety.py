"""Files a crash cannot tear, a full disk cannot corrupt, and a stranger's file cannot use to run code;
and a diverging run that stops before it overwrites its last good checkpoint."""

from __future__ import annotations

import ast
import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cifarlab.cli.main import main
from cifarlab.errors import CheckpointError, CifarlabError
from cifarlab.train import checkpoint as ckpt
from cifarlab.io import atomic_write
from cifarlab.train.checkpoint import load_checkpoint, load_weights, save_checkpoint

from .conftest import REPO, tiny_set_args
from .test_resume import assert_same_run

SRC = REPO / "src" / "cifarlab"


def _cli(capsys, *args: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def _train_args(data: Path, out: Path, name: str, **extra) -> list[str]:
    sets = tiny_set_args(data, **extra)
    return ["train", "--config", str(REPO / "configs/cnn.yaml"), "--out", str(out), "--name", name, *sets]


def _tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


# --------------------------------------------------------------------------- atomic writes
def test_exception_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(1000.0)})
    real_save = torch.save

    def torn_save(obj, f, *a, **k):  # half the bytes reach the disk, then the process "dies"
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise RuntimeError("simulated crash in the middle of a write")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)})
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(1000.0))
    assert _tmp_files(tmp_path) == []


def test_sigkill_at_any_instant_leaves_a_whole_file(tmp_path):
    """Kill a writer process at random instants: the file is always one complete version, never a mix."""
    path = tmp_path / "blob"
    size = 4 << 20  # large enough that a write takes a while
    atomic_write(path, lambda f: f.write(b"\x00" * size))
    rng = random.Random(0)
    for round_ in range(8):
        pid = os.fork()
        if pid == 0:  # child: rewrite the file over and over, each version filled with one byte value
            try:
                for i in range(1, 10**6):
                    atomic_write(path, lambda f, i=i: f.write(bytes([i % 251]) * size))
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        data = path.read_bytes()
        assert len(data) == size and data == data[:1] * size, f"torn file after kill {round_}"
        for t in _tmp_files(tmp_path):  # what a killed writer leaves is only ever a temp file beside it
            t.unlink()


# --------------------------------------------------------------------------- a full disk
def _no_space(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture()
def full_disk(monkeypatch):
    """``fail()`` makes the next torch.save write into /dev/full, where every write fails with ENOSPC.

    torch then raises a RuntimeError ("unexpected pos") with the OSError only as its context: the exact
    shape a real full disk gives, which a plain ``raise OSError`` would not reproduce.
    """
    if not Path("/dev/full").is_char_device():
        pytest.skip("no /dev/full")
    real_save, armed = torch.save, []

    def save(obj, f, *a, **k):
        if armed:
            armed.clear()
            full = open("/dev/full", "wb")  # buffered, like the file atomic_write hands to torch.save
            try:
                return real_save(obj, full, *a, **k)
            finally:
                try:
                    full.close()
                except OSError:
                    pass
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    return lambda: armed.append(1)


def test_full_disk_during_save_keeps_the_old_checkpoint(tmp_path, full_disk):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    full_disk()
    with pytest.raises(CifarlabError, match=r"no disk space left to write .*last.pt; the previous last.pt"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(1 << 16)})
    assert load_checkpoint(path) == {"step": 1}
    assert _tmp_files(tmp_path) == []


def test_full_disk_during_training_exits_2_and_keeps_the_checkpoint(small_folder, tmp_path, monkeypatch, capsys,
                                                                     trained_run, full_disk):
    import cifarlab.train.callbacks as loop  # where the trainer's checkpoint callback writes last.pt

    real, calls = loop.save_checkpoint, []

    def save_checkpoint_(path, state):  # the second checkpoint (end of epoch 2) finds the disk full
        calls.append(1)
        if len(calls) == 2:
            full_disk()
        return real(path, state)

    monkeypatch.setattr(loop, "save_checkpoint", save_checkpoint_)
    rc, err = _cli(capsys, *_train_args(small_folder, tmp_path, "r"))
    run = tmp_path / "r"
    assert rc == 2 and len(err) == 1 and "no disk space" in err[0] and str(run / "last.pt") in err[0], err
    assert len(calls) == 2
    state = load_checkpoint(run / "last.pt")
    assert state["train_state"]["epoch"] == 1  # the previous checkpoint, intact
    assert _tmp_files(run) == []

    # Space freed: the resumed run is the run that never saw a full disk (same settings as `trained_run`).
    monkeypatch.setattr(loop, "save_checkpoint", real)
    assert _cli(capsys, "train", "--resume", str(run))[0] == 0
    assert_same_run(run, trained_run)


def test_full_disk_while_saving_weights_keeps_the_old_ones(trained_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "best.safetensors").read_bytes()
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(os, "fsync", _no_space)  # some file systems report ENOSPC only when flushing
    with pytest.raises(CifarlabError, match="no disk space left to write .*best.safetensors"):
        ckpt.save_weights(run / "best.safetensors", model, {"model": "x"})
    assert (run / "best.safetensors").read_bytes() == before
    assert _tmp_files(run) == []


# Root writes anywhere, and CI runs as root: the write runs in a child that, its imports done, becomes the
# unprivileged user "nobody" (as root) so that the folder's permissions are enforced for real.
UNPRIVILEGED = 65534
WRITER = """
import importlib, os, sys
from pathlib import Path
from cifarlab.errors import CifarlabError
atomic_write = importlib.import_module(sys.argv[1]).atomic_write
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid({uid})
    os.setuid({uid})
try:
    atomic_write(Path(sys.argv[2]) / "x", lambda f: f.write(b"x"))
except CifarlabError as e:
    print(f"uid {{os.getuid()}}: CifarlabError: {{e}}")
    sys.exit(3)
print(f"uid {{os.getuid()}}: written")
""".format(uid=UNPRIVILEGED)


def _write_as_a_user(folder: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", WRITER, atomic_write.__module__, str(folder)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # a deadlock guard


def test_unwritable_run_folder_is_a_clear_error():
    # not under tmp_path: pytest makes /tmp/pytest-of-<user> private, where "nobody" could not even look
    base = Path(tempfile.mkdtemp(prefix="cifarlab-perm-"))
    try:
        base.chmod(0o755)
        ro, rw = base / "ro", base / "rw"
        ro.mkdir(mode=0o555)
        rw.mkdir()
        rw.chmod(0o777)
        r = _write_as_a_user(rw)  # the same child writes where it may: the denial below is the folder's doing
        assert r.returncode == 0 and "written" in r.stdout and (rw / "x").read_bytes() == b"x", r.stdout + r.stderr
        r = _write_as_a_user(ro)
        assert r.returncode == 3 and "cannot write" in r.stdout, r.stdout + r.stderr
        if os.geteuid() == 0:
            assert f"uid {UNPRIVILEGED}:" in r.stdout
        assert list(ro.iterdir()) == []  # no temp file left behind
    finally:
        shutil.rmtree(base)


def test_run_files_follow_the_umask(trained_run):
    """Temp files are created 0600; the renamed result must be readable like any file the user creates."""
    mask = os.umask(0)
    os.umask(mask)
    for name in ("last.pt", "best.safetensors", "metrics.csv", "config.yaml", "summary.json"):
        assert (trained_run / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


# --------------------------------------------------------------------------- malicious files
class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(folder: Path, marker: Path) -> dict[str, Path]:
    """A raw pickle and a torch zip checkpoint, each holding the payload where a checkpoint keeps its weights."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "raw.pt"
    raw.write_bytes(pickle.dumps({"model": _Payload(marker), "train_state": {}}, protocol=2))
    zipped = folder / "zip.pt"
    torch.save({"model": _Payload(marker)}, zipped)
    assert not marker.exists()
    return {"raw": raw, "zip": zipped}


def test_the_payload_works_when_unpickled(tmp_path):
    """The malicious files below are real: plain unpickling runs their code."""
    marker = tmp_path / "marker"
    pickle.loads((_evil_files(tmp_path / "evil", marker)["raw"]).read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("kind", ["raw", "zip"])
def test_malicious_last_pt_is_refused_by_resume(kind, trained_run, tmp_path, capsys):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.copy(_evil_files(tmp_path / "evil", marker)[kind], run / "last.pt")
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    rc, err = _cli(capsys, "train", "--resume", str(run))
    assert rc == 2 and len(err) == 1 and "refusing to load" in err[0] and "could run code" in err[0], err
    assert not marker.exists()
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before  # nothing rewritten


@pytest.mark.parametrize("kind", ["raw", "zip"])
def test_malicious_files_are_refused_by_every_loader(kind, tmp_path):
    marker = tmp_path / "marker"
    evil = _evil_files(tmp_path / "evil", marker)[kind]
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    fake = tmp_path / "best.safetensors"
    shutil.copy(evil, fake)
    (tmp_path / "best.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_weights(fake)
    assert not marker.exists()


def test_malicious_best_weights_are_refused_by_evaluate(trained_run, tmp_path, capsys):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.copy(_evil_files(tmp_path / "evil", marker)["raw"], run / "best.safetensors")
    rc, err = _cli(capsys, "evaluate", str(run))
    assert rc == 2 and len(err) == 1 and "not a valid safetensors file" in err[0], err
    assert not marker.exists()


def test_no_unsafe_deserializer_in_the_source():
    """No cifarlab code unpickles what it did not write: torch.load only with weights_only=True, numpy never
    with allow_pickle=True, no pickle/marshal/dill/joblib/yaml.load; archive.py's restricted unpickler aside."""
    bad = []
    for f in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{f.relative_to(REPO)}:{node.lineno}: {name}"
            if name.endswith("torch.load") and kw.get("weights_only") != "True":
                bad.append(where)
            elif name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") and \
                    kw.get("allow_pickle", "False") != "False":
                bad.append(where)
            elif name in ("pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "dill.load",
                          "dill.loads", "joblib.load", "yaml.load", "yaml.unsafe_load", "yaml.full_load",
                          "eval", "exec", "shelve.open"):
                bad.append(where)
            elif name in ("pickle.Unpickler", "Unpickler") and f.name != "archive.py":
                bad.append(where)
    assert bad == []


# --------------------------------------------------------------------------- numerical faults
def _poison_steps(monkeypatch, steps: set[int]) -> None:
    """Make the training loss NaN at the given global steps (1-based)."""
    import cifarlab.train.step as loop  # the one training step's loss

    real, count = loop.soft_cross_entropy, [0]

    def loss(logits, target, label_smoothing, *weight):
        count[0] += 1
        out = real(logits, target, label_smoothing, *weight)
        return out * float("nan") if count[0] in steps else out

    monkeypatch.setattr(loop, "soft_cross_entropy", loss)


def _finite(tensors: dict) -> bool:
    return all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(small_folder, tmp_path, monkeypatch, capsys):
    # 6 steps per epoch, a checkpoint every 2 steps: NaN at step 3 of epoch 2 (global 9); the checkpoint due
    # after step 4 must not be written, so last.pt stays the one after step 2 of epoch 2.
    _poison_steps(monkeypatch, {9})
    rc, err = _cli(capsys, *_train_args(small_folder, tmp_path, "r", **{"train.epochs": 3, "train.val_every": 1}),
                   "--checkpoint-every-steps", "2")
    assert rc == 3 and len(err) == 1, err
    assert "non-finite loss in epoch 2 at step 3" in err[0] and "--nan-policy stop" in err[0]
    state = load_checkpoint(tmp_path / "r" / "last.pt")
    assert (state["train_state"]["epoch"], state["train_state"]["step"]) == (1, 2)
    assert _finite(state["model"]) and _finite(load_file(tmp_path / "r" / "best.safetensors"))
    assert len((tmp_path / "r" / "metrics.csv").read_text().strip().splitlines()) == 2  # header + epoch 1


def test_real_divergence_is_caught(small_folder, tmp_path, capsys):
    rc, err = _cli(capsys, *_train_args(small_folder, tmp_path, "r", **{"optim.lr": 1e30}))
    assert rc == 3 and len(err) == 1 and "non-finite loss in epoch 1 at step" in err[0], err
    assert not (tmp_path / "r" / "last.pt").exists()  # no good state was ever reached: nothing saved


def test_skip_batch_policy_skips_and_counts(small_folder, tmp_path, monkeypatch, capsys):
    _poison_steps(monkeypatch, {2, 9})
    rc, _ = _cli(capsys, *_train_args(small_folder, tmp_path, "r"), "--nan-policy", "skip-batch")
    assert rc == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["skipped_batches"] == 2
    assert _finite(load_checkpoint(tmp_path / "r" / "last.pt")["model"])
