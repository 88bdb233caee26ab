"""``train --resume`` from every state a crash can leave a run directory in, the checkpoint it keeps in
reserve, what ``--resume`` lets a user change, and a scan that every file cifarlab writes is written
atomically. The random kills themselves are in tests/test_chaos.py (slow)."""

from __future__ import annotations

import ast
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from cifarlab.cli.main import main
from cifarlab.errors import ConfigError
from cifarlab.io import atomic_write
from cifarlab.train.checkpoint import load_checkpoint, previous_path, save_checkpoint
from cifarlab.train.loop import _open_run_dir, prepare_run_dir
from cifarlab.train.resume import find_checkpoint, resume_config

from .conftest import REPO
from .test_resume import _metrics, assert_same_run

SRC = REPO / "src" / "cifarlab"


def _cli(capsys, *args: str) -> tuple[int, list[str], list[str]]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return e.value.code, out.strip().splitlines(), err.strip().splitlines()


def _tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def _copy(trained_run: Path, dst: Path) -> Path:
    shutil.copytree(trained_run, dst)
    return dst


def _killed_before_first_checkpoint(trained_run: Path, dst: Path) -> Path:
    """What a SIGKILL at the end of epoch 1, after best weights and metrics.csv but before last.pt, leaves."""
    run = _copy(trained_run, dst)
    for name in ("last.pt", "last.prev.pt", "summary.json", "test_metrics.json", "test_logits.npz"):
        (run / name).unlink(missing_ok=True)
    lines = (run / "metrics.csv").read_text().splitlines(keepends=True)
    (run / "metrics.csv").write_text("".join(lines[:2]))  # header + epoch 1
    (run / ".last.pt.x1y2z3.tmp").write_bytes(b"PK\x03\x04 cut short")  # the checkpoint write the kill cut
    return run


# --------------------------------------------------------------------------- no checkpoint yet
def test_resume_without_a_checkpoint_starts_the_run_from_its_config(trained_run, tmp_path, capsys):
    run = _killed_before_first_checkpoint(trained_run, tmp_path / "run")
    rc, out, err = _cli(capsys, "train", "--resume", str(run))
    assert rc == 0, err
    notes = [line for line in out if line.startswith("no ")]
    assert notes == [f"no checkpoint in {run} yet (stopped before the first one): starting the run from its "
                     f"config.yaml"]
    assert_same_run(run, trained_run)
    assert _tmp_files(run) == []
    assert not (run / "test_metrics.json").exists()


def test_name_on_a_run_killed_before_its_first_checkpoint_says_how_to_go_on(trained_run, tmp_path, capsys):
    run = _killed_before_first_checkpoint(trained_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    rc, _, err = _cli(capsys, "train", "--config", str(run / "config.yaml"), "--out", str(tmp_path), "--name", "run")
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"cifarlab: error: run directory {run} holds a run stopped before its first checkpoint; pass "
                      f"--resume {run} to start it again from its config.yaml, or --overwrite to replace it")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_directory_with_only_temp_files_is_free_for_a_new_run(tmp_path):
    """A kill between mkdir and the first file leaves an empty folder or a temp file: the name is not taken."""
    from cifarlab.config import load_config

    run = tmp_path / "r"
    run.mkdir()
    (run / ".config.yaml.abc.tmp").write_text("data: {tr")
    cfg = load_config(REPO / "configs/cnn.yaml")
    assert prepare_run_dir(tmp_path, "r", cfg, resume=False, overwrite=False) == run
    _open_run_dir(run, clear=False)
    assert list(run.iterdir()) == []


def test_resume_of_an_empty_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    rc, _, err = _cli(capsys, "train", "--resume", str(tmp_path / "r"))
    assert rc == 2 and len(err) == 1 and "not a run directory (no config.yaml)" in err[0], err
    assert "start it again with the command that created it" in err[0]


# --------------------------------------------------------------------------- damaged checkpoints
@pytest.mark.parametrize("damage", ["torn", "garbage", "missing", "empty"])
def test_unreadable_last_pt_falls_back_to_the_previous_checkpoint(damage, trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    assert load_checkpoint(run / "last.prev.pt")["train_state"]["epoch"] == 1  # the end of epoch 1, kept
    last = run / "last.pt"
    if damage == "torn":
        last.write_bytes(last.read_bytes()[:5000])
    elif damage == "garbage":
        last.write_bytes(os.urandom(4096))
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        last.unlink()  # a kill between the two renames where the file system has no hard links
    rc, out, err = _cli(capsys, "train", "--resume", str(run))
    assert rc == 0, err
    note = [line for line in out if line.endswith("last.prev.pt")]
    assert len(note) == 1 and note[0].endswith("; resuming from the previous checkpoint, last.prev.pt"), out
    assert (f"{last} is missing" in note[0]) if damage == "missing" else ("damaged or not a checkpoint" in note[0])
    assert f"resuming {run} at epoch 2, step 0" in out
    assert_same_run(run, trained_run)
    # The unreadable file was set aside, not rotated into the reserve: last.prev.pt is still the good one.
    assert load_checkpoint(run / "last.prev.pt")["train_state"]["epoch"] == 1
    assert (run / "last.pt.damaged").is_file() == (damage != "missing")


def test_no_readable_checkpoint_starts_the_run_again(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    for name in ("last.pt", "last.prev.pt"):
        (run / name).write_bytes((run / name).read_bytes()[:3000])
    rc, out, err = _cli(capsys, "train", "--resume", str(run))
    assert rc == 0, err
    note = [line for line in out if line.startswith("no ")]
    assert len(note) == 1 and note[0].startswith(f"no usable checkpoint in {run} (") and note[0].endswith(
        "): starting the run again from its config.yaml"), out
    assert note[0].count("damaged or not a checkpoint") == 2
    assert_same_run(run, trained_run)


def test_a_checkpoint_of_another_model_is_an_error_not_a_fallback(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["hidden"] = 16  # config.yaml edited by hand
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc, _, err = _cli(capsys, "train", "--resume", str(run))
    assert rc == 2 and len(err) == 1 and f"{run / 'last.pt'} does not fit this model" in err[0], err


# --------------------------------------------------------------------------- the rotation
def test_save_checkpoint_keeps_the_one_it_replaces(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"n": 1})
    assert not previous_path(path).exists()
    save_checkpoint(path, {"n": 2})
    save_checkpoint(path, {"n": 3})
    assert load_checkpoint(path) == {"n": 3} and load_checkpoint(tmp_path / "last.prev.pt") == {"n": 2}
    assert os.stat(path).st_ino != os.stat(previous_path(path)).st_ino
    assert _tmp_files(tmp_path) == []
    state, found, note = find_checkpoint(tmp_path)
    assert state == {"n": 3} and found == path and note is None


@pytest.mark.parametrize("links", [True, False])
def test_sigkill_at_any_instant_of_a_rotating_write(links, tmp_path):
    """Kill a process that rewrites a file with keep_previous, at random instants: the newest whole version is
    always there (as the file, or as its previous while the fallback rename runs), and the previous is the
    version before it."""
    path, prev = tmp_path / "blob", tmp_path / "blob.prev"
    size = 1 << 20
    rng = random.Random(1)
    for round_ in range(6):
        for p in (path, prev, *_tmp_files(tmp_path)):
            p.unlink(missing_ok=True)
        atomic_write(path, lambda f: f.write(bytes([0]) * size))
        pid = os.fork()
        if pid == 0:
            try:
                if not links:
                    def no_link(*a, **k):
                        raise OSError(1, "Operation not permitted")
                    os.link = no_link
                for i in range(1, 10**6):
                    atomic_write(path, lambda f, i=i: f.write(bytes([i % 251]) * size), keep_previous=prev)
            finally:
                os._exit(0)
        import time

        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        versions = {}
        for name, p in (("file", path), ("prev", prev)):
            if p.exists():
                data = p.read_bytes()
                assert len(data) == size and data == data[:1] * size, f"torn {name} after kill {round_}"
                versions[name] = data[0]
        if links:
            assert "file" in versions, f"no file after kill {round_}"
        assert versions, f"neither file after kill {round_}"
        if "file" in versions and "prev" in versions:
            assert versions["prev"] in ((versions["file"] - 1) % 251, versions["file"]), versions


# --------------------------------------------------------------------------- what --resume may change
@pytest.mark.parametrize("flags", [["--config", "configs/cnn.yaml"], ["--name", "other"], ["--out", "elsewhere"],
                                   ["--overwrite"], ["--name", "x", "--out", "y"]])
def test_resume_refuses_flags_that_name_another_run(flags, trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    rc, _, err = _cli(capsys, "train", "--resume", str(run), *flags)
    given = [f for f in ("--config", "--out", "--name", "--overwrite") if f in flags]
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"cifarlab: error: --resume {run} continues that run with its own config.yaml, folder and "
                      f"name: drop {', '.join(given)} (or start a new run without --resume)")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("sets,match", [
    (["--set", "optim.lr=0.5"], "cannot change optim.lr (0.001 -> 0.5)"),
    (["--set", "train.seed=3", "--set", "data.augment_p=0"], "cannot change data.augment_p (0.5 -> 0.0), train.seed (0 -> 3)"),
    (["--epochs", "1"], "train.epochs=1 is fewer than the run's 2"),
])
def test_resume_refuses_overrides_that_make_another_run(sets, match, trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    before = (run / "config.yaml").read_text()
    rc, _, err = _cli(capsys, "train", "--resume", str(run), *sets)
    assert rc == 2 and len(err) == 1 and match in err[0], err
    assert (run / "config.yaml").read_text() == before


def test_resume_with_more_epochs_continues_the_run(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    first = _metrics(run)
    rc, out, err = _cli(capsys, "train", "--resume", str(run), "--epochs", "3", "--set", "train.device=cpu")
    assert rc == 0, err
    assert [line for line in out if line.startswith("resume:")] == [
        "resume: train.epochs 2 -> 3: the run goes on past its planned end; from here its schedule spans 3 epochs, "
        "so it is not the run a 3-epoch start would give"]  # train.device was cpu already: no note
    assert f"resuming {run} at epoch 3, step 0" in out
    rows = _metrics(run)
    assert len(rows) == 3 and rows[:2] == first
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3
    assert load_checkpoint(run / "last.pt")["train_state"]["epoch"] == 3


def test_resume_may_change_how_the_run_executes(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    rc, out, err = _cli(capsys, "train", "--resume", str(run), "--set", "train.log_every=7",
                        "--checkpoint-every-steps", "5")
    assert rc == 0, err
    assert [line for line in out if line.startswith("resume:")] == [
        "resume: train.checkpoint_every_steps: 0 -> 5", "resume: train.log_every: 20 -> 7"]
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (saved["log_every"], saved["checkpoint_every_steps"]) == (7, 5)


def test_more_epochs_cannot_stretch_a_onecycle_schedule(tmp_path):
    from cifarlab.config import load_config

    run = tmp_path / "r"
    run.mkdir()
    load_config(REPO / "configs/cnn.yaml", ["optim.schedule=onecycle", "train.epochs=4"]).save(run / "config.yaml")
    with pytest.raises(ConfigError, match="cannot extend optim.schedule=onecycle"):
        resume_config(run, ["train.epochs=6"])
    cfg, notes = resume_config(run, ["train.epochs=4", "train.precision=fp32"])
    assert cfg.train.epochs == 4 and notes == ["train.precision: 'auto' -> 'fp32'"]


# --------------------------------------------------------------------------- every write is atomic
WRITERS = {"write_text", "write_bytes", "savefig", "savez", "savez_compressed", "to_csv", "copyfile"}
SAVERS = {"torch", "np", "numpy", "onnx", "jit"}  # X.save(obj, file) of these writes a file
# (file, function): writes that need not be atomic, and why.
NOT_ATOMIC_ON_PURPOSE = {
    # builds a fake CIFAR archive for tests and benchmarks; a torn one fails its md5 check
    ("data/archive.py", "write_fake_archive"),
    # a scratch copy of an IDX member in a TemporaryDirectory, for torchvision's reader that takes a file name
    ("data/archive.py", "_idx"),
    # np.savez into a BytesIO: a fold's predictions for the shared storage, no file
    ("audit/claimed.py", "_npz_bytes"),
}


def _write_calls(tree: ast.AST):
    """(call, enclosing functions and lambdas) for every call that writes a file."""
    found = []

    def visit(node, chain):
        for child in ast.iter_child_nodes(node):
            c = chain + [child] if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else chain
            if isinstance(child, ast.Call):
                f = child.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                mode = child.args[1] if len(child.args) > 1 else next(
                    (k.value for k in child.keywords if k.arg == "mode"), None)
                writes_open = name in ("open", "fdopen") and isinstance(mode, ast.Constant) and any(
                    m in str(mode.value) for m in "wax+")
                saver = name == "save" and isinstance(f, ast.Attribute) and (
                    getattr(f.value, "id", None) in SAVERS or getattr(f.value, "attr", None) in SAVERS)
                if name in WRITERS or writes_open or saver:
                    found.append((child, c))
            visit(child, c)

    visit(tree, [])
    return found


def test_every_file_is_written_atomically():
    """Every call that writes a file runs inside a function handed to atomic_write (temp file, fsync, rename),
    or in a function that renames its own temp file into place (os.replace)."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        rel = str(path.relative_to(SRC))
        handed = {a.id for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(
            n.func, "attr", "")) == "atomic_write" for a in n.args if isinstance(a, ast.Name)}
        lambdas = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(
            n.func, "attr", "")) == "atomic_write" for a in n.args if isinstance(a, ast.Lambda)}
        for call, chain in _write_calls(tree):
            funcs = [c for c in chain if not isinstance(c, ast.Lambda)]
            if any(id(c) in lambdas for c in chain) or any(c.name in handed for c in funcs):
                continue
            if funcs and any(isinstance(n, ast.Call) and ast.unparse(n.func) == "os.replace"
                             for n in ast.walk(funcs[-1])):
                continue  # its own temp file + os.replace (atomic_write itself, the archive download)
            if funcs and (rel, funcs[0].name) in NOT_ATOMIC_ON_PURPOSE:
                continue
            bad.append(f"{rel}:{call.lineno} ({funcs[0].name if funcs else 'module'})")
    assert bad == [], "files written without atomic_write: " + ", ".join(bad)
