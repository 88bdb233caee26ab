"""Under ``CI=true`` a skipped test is a failed test, unless it is marked ``cuda`` (CI has no GPU).

A skip says "this did not run here"; on a developer's laptop that is fine (no Chromium, no PostgreSQL),
but CI installs everything the suite needs, so there a skip means a test that quietly stopped running.
xfail is not a skip and is left alone. Loaded by tests/conftest.py; tests/test_ci_skips.py checks it.
"""

from __future__ import annotations

import os

import pytest


def _in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _as_failure(report, what: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{what} skipped under CI=true (only tests marked `cuda` may skip there): {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if (_in_ci() and report.skipped and not hasattr(report, "wasxfail")
            and item.get_closest_marker("cuda") is None):
        _as_failure(report, "test")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if _in_ci() and report.skipped:  # a whole module skipped, e.g. by a module-level importorskip
        _as_failure(report, "module")
    return report
