"""tests/ci_skips.py: under CI=true a skip fails the run (a CUDA-marked one excepted); elsewhere it stays a skip.

Runs pytest in a subprocess on a small generated test folder with only that plugin loaded."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import REPO

CASES = '''
import pytest

def test_passes():
    pass

def test_skips_in_its_body():
    pytest.skip("no chromium here")

@pytest.mark.skipif(True, reason="no postgres here")
def test_skipif():
    pass

@pytest.fixture
def service():
    pytest.skip("service down")

def test_skips_in_a_fixture(service):
    pass

@pytest.mark.cuda
@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_cuda_only():
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_known_bug():
    assert False
'''


def _run(tmp_path, ci: str | None) -> dict:
    """Outcome per test (and per module for collection) from pytest's -rA summary, the counts from its last line,
    its exit status and its output."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a CUDA device\n")
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "test_module_skip.py").write_text("import pytest\npytest.importorskip('no_such_module_x')\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.ci_skips", "-p", "no:cacheprovider", "-rA",
           "--continue-on-collection-errors", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)  # a deadlock guard
    out = {}
    for line in r.stdout.splitlines():
        m = re.match(r"(PASSED|FAILED|ERROR|XFAIL|XPASS|SKIPPED) (?:\[\d+\] )?(\S+?)(?::\d+)?(?: - |: |$)", line)
        if m:
            name = m.group(2).split("::")[-1]
            out[name.removesuffix(".py")] = m.group(1)
    last = r.stdout.strip().splitlines()[-1]
    out["counts"] = {k: int(n) for n, k in re.findall(r"(\d+) (failed|passed|skipped|xfailed|xpassed|errors?)", last)}
    out["counts"] = {("errors" if k == "error" else k): n for k, n in out["counts"].items()}
    out["rc"] = r.returncode
    out["stdout"] = r.stdout
    return out


def test_skips_fail_under_ci_except_cuda(tmp_path):
    got = _run(tmp_path, "true")
    assert got["rc"] == 1, got["stdout"]
    for name in ("test_skips_in_its_body", "test_skipif", "test_skips_in_a_fixture"):
        assert got.get(name) in ("FAILED", "ERROR"), (name, got["stdout"])
    assert got.get("test_module_skip") in ("FAILED", "ERROR"), got["stdout"]
    assert "skipped under CI=true" in got["stdout"] and "no postgres here" in got["stdout"]
    assert got.get("test_passes") == "PASSED" and got.get("test_known_bug") == "XFAIL", got["stdout"]
    assert re.search(r"SKIPPED \[1\] test_cases.py:\d+: needs a CUDA device", got["stdout"])  # the one skip left
    assert got["counts"] == {"failed": 1, "passed": 1, "skipped": 1, "xfailed": 1, "errors": 3}, got["stdout"]


@pytest.mark.parametrize("ci", [None, "false"])
def test_skips_stay_skips_outside_ci(tmp_path, ci):
    got = _run(tmp_path, ci)
    assert got["rc"] == 0, got["stdout"]
    assert "FAILED" not in got["stdout"] and "ERROR" not in got["stdout"], got["stdout"]
    assert got["counts"] == {"passed": 1, "skipped": 5, "xfailed": 1}, got["stdout"]  # 4 tests and the module
