"""tests/pause.py, the helper that holds a process where a test means to stop it: which calls pause, and once."""

from __future__ import annotations

import os

import pytest

from .pause import _Rules


def _paused(ctrl) -> list[str]:
    return sorted(p.name for p in ctrl.iterdir() if p.name.startswith("paused-"))


def test_each_rule_pauses_once_at_its_point(tmp_path):
    ctrl = tmp_path / "ctrl"
    ctrl.mkdir()
    for k in range(3):
        (ctrl / f"go-{k}").touch()  # let every pause go on at once: this test only looks at where they happen
    rules = _Rules(ctrl, ["*/trials/trial-0001@start", "*/seed-0@epoch=2", "*/run@checkpoint=1.3"])
    rules.at("/x/trials/trial-0000", "start")
    rules.at("/x/seed-0", "epoch", 1)
    rules.at("/x/run", "checkpoint", (1, 2))
    rules.at("/x/other", "checkpoint", (1, 4))
    assert _paused(ctrl) == []
    rules.at("/x/trials/trial-0001", "start")
    rules.at("/x/seed-0", "epoch", 2)
    rules.at("/x/run", "checkpoint", (2, 0))  # the first at or past epoch 1, step 3
    assert _paused(ctrl) == ["paused-0", "paused-1", "paused-2"]
    assert (ctrl / "paused-2").read_text() == str(os.getpid())
    for f in ctrl.glob("paused-*"):
        f.unlink()
    rules.at("/x/trials/trial-0001", "start")
    rules.at("/x/run", "checkpoint", (2, 4))
    assert _paused(ctrl) == []  # once per process


@pytest.mark.parametrize("rule", ["run@later", "run@start=1", "run@epoch", "@epoch=1", "run"])
def test_a_malformed_rule_is_refused(tmp_path, rule):
    with pytest.raises(ValueError, match="pause rule"):
        _Rules(tmp_path, [rule])
