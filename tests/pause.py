"""Pause a cifarlab process at an exact point of its training, so that a test stops it there and nowhere else.

A test that kills or signals a training process must not guess, by polling its output against the clock,
that the process is where the test means it to be: on a slow or busy machine the guess misses. Instead,
the process under test is started with pause rules; at a rule's point it writes ``CTRL/paused-K`` (K the
rule's index; the file holds its pid) and waits until ``CTRL/go-K`` exists. The test waits for the first
file (:func:`wait_paused`), does what it means to (SIGKILL, SIGTERM, read the checkpoint on disk), then
lets it go on (:func:`release`) or not. Signals reach the waiting process as they would reach it at that
point of its training (a handler runs; a KeyboardInterrupt raised there propagates through ``fit``).

A rule is ``GLOB@WHEN``. GLOB is matched (fnmatch) against the run directory, ``out_dir/name`` as ``fit`` is
called with them (a sweep trial: ``.../SWEEP/trials/trial-0001``; a seed: ``.../final/cnn/seed-0``). WHEN is

- ``start``: as ``fit`` is called, before it does anything;
- ``epoch=N``: after epoch N's checkpoint, metrics row, log line and ``on_epoch_end`` (the caller's first);
- ``checkpoint=E.S``: once the first ``last.pt`` at or past epoch E, step S (its ``train_state``: E completed
  epochs, S steps into the next, what a resume starts from) is written.

Each rule pauses once per process. Three ways in:

- ``python -m tests.pause CTRL RULE [RULE ...] -- ARGS``: ``cifarlab ARGS`` with the rules;
- :func:`install` in a script, before it trains;
- ``CIFARLAB_TEST_PAUSE`` (set by :func:`env`) installs the rules in every process that imports this
  module, which includes ``sweep run --workers N``'s spawned workers when the main module is this one.

The hooks wrap ``cifarlab.train.fit`` and ``cifarlab.train.checkpoint.save_checkpoint`` wherever a loaded
cifarlab module holds them, and as module attributes, so later imports of either name get the wrappers.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = "CIFARLAB_TEST_PAUSE"
POLL = 0.02  # seconds between looks at a control file: how fast, not whether, a pause is seen
GUARD = 1800.0  # a deadlock guard, never reached by a process that works, however slow the machine


# --------------------------------------------------------------------------- the process under test
class _Rules:
    def __init__(self, ctrl: Path, rules: list[str]):
        self.ctrl = Path(ctrl)
        self.rules = []
        for k, rule in enumerate(rules):
            glob, _, when = rule.rpartition("@")
            kind, _, arg = when.partition("=")
            if not glob or kind not in ("start", "epoch", "checkpoint") or (kind == "start") == bool(arg):
                raise ValueError(f"pause rule {rule!r}: want GLOB@start, GLOB@epoch=N or GLOB@checkpoint=E.S")
            self.rules.append((k, glob, kind, arg))
        self.done: set[int] = set()

    def at(self, run_dir: Path | str, kind: str, where=None) -> None:
        for k, glob, kind_, arg in self.rules:
            if k in self.done or kind_ != kind or not fnmatch.fnmatch(str(run_dir), glob):
                continue
            if (kind == "epoch" and int(arg) != where) or (
                    kind == "checkpoint" and tuple(int(x) for x in arg.split(".")) > where):
                continue
            self.done.add(k)
            _pause(self.ctrl, k)


def _pause(ctrl: Path, k: int) -> None:
    go = ctrl / f"go-{k}"
    tmp = ctrl / f".paused-{k}.tmp"
    tmp.write_text(str(os.getpid()))
    tmp.rename(ctrl / f"paused-{k}")  # whole or absent: the test never reads half a pid
    while not go.exists():
        time.sleep(POLL)


def _replace_everywhere(original, replacement) -> None:
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("cifarlab"):
            for name, value in list(vars(mod).items()):
                if value is original:
                    setattr(mod, name, replacement)


def install(ctrl: Path | str, rules: list[str]) -> None:
    """Wrap fit and save_checkpoint so that the process pauses at the rules' points."""
    import cifarlab.cli.main  # noqa: F401  (loads the modules that hold fit / save_checkpoint by name)
    import cifarlab.train
    import cifarlab.train.checkpoint

    state = _Rules(Path(ctrl), rules)
    real_fit, real_save = cifarlab.train.fit, cifarlab.train.checkpoint.save_checkpoint

    @functools.wraps(real_fit)
    def fit(cfg, out_dir="runs", name=None, **kw):
        run_dir = Path(out_dir) / str(name)
        state.at(run_dir, "start")
        user = kw.get("on_epoch_end")

        def on_epoch_end(epoch, row):
            if user is not None:
                user(epoch, row)
            state.at(run_dir, "epoch", epoch)

        return real_fit(cfg, out_dir, name, **{**kw, "on_epoch_end": on_epoch_end})

    @functools.wraps(real_save)
    def save_checkpoint(path, ckpt, *a, **kw):
        real_save(path, ckpt, *a, **kw)
        ts = (ckpt.get("train_state") or {}) if isinstance(ckpt, dict) else {}
        if "epoch" in ts and "step" in ts:
            state.at(Path(path).parent, "checkpoint", (ts["epoch"], ts["step"]))

    _replace_everywhere(real_fit, fit)
    _replace_everywhere(real_save, save_checkpoint)


def _from_env() -> None:
    value = os.environ.get(ENV)
    if value:
        ctrl, *rules = value.split("|")
        install(ctrl, rules)


# --------------------------------------------------------------------------- the test's side
def env(ctrl: Path, rules: list[str], base: dict | None = None) -> dict:
    """An environment in which ``python -m tests.pause -- ARGS`` (and its spawned workers) pause at ``rules``."""
    ctrl.mkdir(parents=True, exist_ok=True)
    base = os.environ if base is None else base
    path = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH", "")) if p)  # `tests` from any cwd
    return {**base, ENV: "|".join([str(ctrl), *rules]), "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def command(*args: str) -> list[str]:
    """``cifarlab ARGS`` through this module, to run with :func:`env`'s environment."""
    return [sys.executable, "-m", "tests.pause", "--", *args]


def wait_paused(ctrl: Path, k: int, proc: subprocess.Popen, log: Path | None = None) -> int:
    """Wait until the process is paused at rule ``k``; returns the pid that paused (a sweep worker's, say)."""
    f = ctrl / f"paused-{k}"
    t0 = time.monotonic()
    while not f.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before pause {k}"
                                 + (f":\n{log.read_text()[-3000:]}" if log else ""))
        if time.monotonic() - t0 > GUARD:
            proc.kill()
            raise AssertionError(f"pause {k} not reached in {GUARD:.0f} s (a deadlock guard)")
        time.sleep(POLL)
    return int(f.read_text())


def release(ctrl: Path, k: int) -> None:
    """Let the process paused at rule ``k`` go on."""
    (ctrl / f"go-{k}").touch()


_from_env()

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit("usage: python -m tests.pause [CTRL RULE ...] -- CIFARLAB-ARGS")
    i = argv.index("--")
    if i:
        install(argv[0], argv[1:i])
    from cifarlab.cli.main import main

    main(argv[i + 1:])
