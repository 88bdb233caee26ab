"""Training to a time budget (``--time 10m``, ``train.time_budget``) instead of an epoch count.

An epoch costs 100 times more on a laptop CPU than on a GPU, so a recipe written in epochs cannot promise a
wall-clock length. Before the first step, :func:`plan` times a few training steps and a validation pass on the
run's own parts (on copies: the run itself starts untouched), then sets ``train.steps`` (and ``train.epochs``,
the last one partial) so that training, validations and checkpoints end at the budget, and the warm-up and
decay schedule with them. The data's decoding happens before and is reported apart, not counted.

The plan is written into the run's ``config.yaml``: ``--resume`` continues the same steps, i.e. it trains for
what is left of the budget (the schedule, fixed by the plan, stays bit-exact). Ultralytics' ``time`` argument
does the same by epochs; here the unit is the step, so a short budget is met within a few percent.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from ..coerce import parse_duration
from ..config import fit_schedule_to_epochs
from ..evaluation.inference import predict_logits
from .state import Parts
from .step import train_step

WARMUP_STEPS = 2  # kernel selection, allocator warm-up: not timed
TIMED_STEPS = 6
MARGIN = 0.02  # of the budget, for what the plan cannot time (the last log lines, a slower step here and there)


@dataclass
class Plan:
    budget: float  # seconds
    spent: float  # seconds gone before training starts (timing the steps included)
    step_seconds: float
    val_seconds: float  # one validation pass
    steps: int
    epochs: int
    validations: int

    def line(self) -> str:
        return (f"time budget {self.budget:.0f}s: {self.steps} steps ({self.epochs} epoch(s), {self.validations} "
                f"validation(s)) at {self.step_seconds * 1e3:.0f} ms a step and {self.val_seconds:.1f}s a "
                f"validation; {self.spent:.1f}s spent before the first step")


def plan(parts: Parts, started: float, log=lambda s: None) -> Plan:
    """Size the run to ``train.time_budget`` counted from ``started`` (``time.perf_counter()`` once the data
    was loaded): set ``train.steps`` and ``train.epochs``; the caller rebuilds the schedule for them
    (:func:`cifarlab.train.loop.build_optimization`)."""
    cfg, t = parts.cfg, parts.cfg.train
    budget = parse_duration("train.time_budget", t.time_budget)
    step_s = _time_steps(parts)
    val_s = _time_validation(parts)
    spent = time.perf_counter() - started
    n = len(parts.batches)
    left = budget * (1 - MARGIN) - spent
    has_val = len(parts.data.val_x) > 0

    def cost(steps: int) -> float:  # grows with steps: the largest that fits is found by bisection
        return steps * step_s + (_validations(math.ceil(steps / n), t.val_every) * val_s if has_val else 0.0)

    lo, hi = 1, max(1, int(left / step_s))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid - 1)
    steps = lo
    epochs = max(1, math.ceil(steps / n))
    config_epochs, t.epochs, t.steps = t.epochs, epochs, steps
    t.val_every = min(t.val_every, epochs)
    fit_schedule_to_epochs(cfg, config_epochs, say=log)  # an absolute warm-up keeps its share of the run
    p = Plan(budget, spent, step_s, val_s, steps, epochs, _validations(epochs, t.val_every) if has_val else 0)
    log(p.line())
    return p


def _validations(epochs: int, every: int) -> int:
    return sum(1 for e in range(1, epochs + 1) if e % every == 0 or e == epochs)


def _time_steps(parts: Parts) -> float:
    """Seconds per training step, timed on copies of the model, optimizer, EMA and Lookahead; the global RNG
    is restored, so the run that follows is the one it would have been."""
    rng = torch.get_rng_state()
    model, optimizer, ema, lookahead = copy.deepcopy((parts.model, parts.optimizer, parts.ema, parts.lookahead))
    trial = copy.copy(parts)
    trial.model = trial.train_model = model
    trial.optimizer, trial.ema, trial.lookahead = optimizer, ema, lookahead
    model.train()
    seconds, batches = [], parts.batches.epoch(0)
    try:
        for i in range(WARMUP_STEPS + TIMED_STEPS):
            try:
                _, x, y = next(batches)
            except StopIteration:
                batches = parts.batches.epoch(i)
                _, x, y = next(batches)
            t0 = time.perf_counter()
            x, target = parts.mix(x, y, 0, i) if parts.mix is not None else (x, y)
            res = train_step(trial, x, target, i, nan_policy="stop")
            float(res.loss)  # wait for the step (a host sync, as the loop's log points do)
            if i >= WARMUP_STEPS:
                seconds.append(time.perf_counter() - t0)
    finally:
        torch.set_rng_state(rng)
    return sorted(seconds)[len(seconds) // 2]  # the median: one slow step (a page fault) does not size the run


def _time_validation(parts: Parts) -> float:
    """Seconds of one validation pass, from a timed share of the validation images."""
    x = parts.data.val_x
    if not len(x):
        return 0.0
    k = min(len(x), 2 * parts.cfg.train.eval_batch_size)
    predict_logits(parts.eval_model, x[:min(k, 64)], parts.batches, parts.rt, parts.cfg.train.eval_batch_size)
    t0 = time.perf_counter()
    predict_logits(parts.eval_model, x[:k], parts.batches, parts.rt, parts.cfg.train.eval_batch_size)
    return (time.perf_counter() - t0) * len(x) / k
