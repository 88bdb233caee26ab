"""The suite started as a script's background job (``python -m pytest ... &``): bash starts such a job with
SIGINT ignored, and exec keeps it ignored, so every handler "from before" that cifarlab saves and restores
is SIG_IGN. The tests that stop training with SIGINT run here in a pytest started that way, so that a stop
handed back to "ignore" (issue 27: a sweep worker lost a Ctrl-C that came as a trial ended) cannot come back.
They are slow tests (``-m slow``): each starts a pytest of its own that runs tests of the default suite again.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from . import pause
from .conftest import REPO


def _ignore_sigint() -> None:  # what bash does for `cmd &` in a script (no job control)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pytest_with_sigint_ignored(*nodes: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *nodes]
    return subprocess.run(cmd, cwd=REPO, preexec_fn=_ignore_sigint, capture_output=True, text=True,
                          timeout=pause.GUARD)  # a deadlock guard


def test_the_child_really_starts_with_sigint_ignored():
    r = subprocess.run([sys.executable, "-c", "import signal; print(int(signal.getsignal(signal.SIGINT)))"],
                       preexec_fn=_ignore_sigint, capture_output=True, text=True, timeout=pause.GUARD)
    assert r.stdout.strip() == str(int(signal.SIG_IGN)), r.stdout + r.stderr


@pytest.mark.slow  # each runs tests of the default suite again, in a pytest of its own
def test_sigint_stops_of_training_and_sweeps_with_sigint_ignored_at_start():
    r = _pytest_with_sigint_ignored(
        "tests/test_resume.py::test_sigint_mid_epoch_then_resume_is_bit_exact",
        "tests/test_sweep_run.py::test_interrupt_queues_the_running_trial_and_rerun_finishes")
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-6000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_a_stop_as_a_trial_ends_with_sigint_ignored_at_start():
    """The stop that came after a trial's last step was handed back to SIG_IGN and lost: the worker went on to
    its next trial (``DID NOT RAISE SweepInterrupted``) until the worker took SIGINT itself (sweep/claims.py)."""
    r = _pytest_with_sigint_ignored(
        "tests/test_sweep_run.py::test_a_stop_as_a_trial_ends_keeps_its_result_and_stops_the_worker")
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-6000:] + r.stderr[-3000:]
