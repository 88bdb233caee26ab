"""Ctrl-C at an exact training step, in process: ``with ctrl_c_at(monkeypatch, epoch=1, step=6): ...``.

The training loop draws each step's seed (``cifarlab.train.loop.step_seed``) once per step, before the forward
pass; raising SIGINT there stops the run as a Ctrl-C at that point would (the step finishes, a checkpoint is
written, exit 130). Epoch and step count from 0, as in ``step_seed``. For a separate process stopped at a chosen
point, see tests/pause.py.
"""

from __future__ import annotations

import signal


class ctrl_c_at:  # noqa: N801 (used as a function)
    """Raise SIGINT as epoch ``epoch``, step ``step`` starts: from now until the ``with`` block ends (or
    :meth:`undo`, or the end of the test, since ``monkeypatch`` undoes it then too)."""

    def __init__(self, monkeypatch, epoch: int, step: int):
        import cifarlab.train.loop as loop

        self._loop, self._real, self._monkeypatch = loop, loop.step_seed, monkeypatch
        real = self._real

        def step_seed(seed, e, s, *rest):
            if (e, s) == (epoch, step):
                signal.raise_signal(signal.SIGINT)
            return real(seed, e, s, *rest)

        monkeypatch.setattr(loop, "step_seed", step_seed)

    def undo(self) -> None:
        self._monkeypatch.setattr(self._loop, "step_seed", self._real)

    def __enter__(self) -> "ctrl_c_at":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()
