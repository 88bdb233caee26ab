"""Training to a time budget (``--time 10m``, ``train.time_budget``) instead of an epoch count.

An epoch costs 100 times more on a laptop CPU than on a GPU, so a recipe written in epochs cannot promise a
wall-clock length. Before the first step, :func:`plan` times a few training steps and a validation pass on the
run's own parts (on copies: the run itself starts untouched), then sets ``train.steps`` (and ``train.epochs``,
the last one partial) so that training, validations and checkpoints end at the budget, and the warm-up and
decay schedule with them. The data's decoding happens before and is reported apart, not counted.

The copies' steps are few and may run colder than the run's own (kernel selection, page faults, another
process on the machine), so the plan is corrected once from the run itself: :class:`Replan` times the run's
first real steps (at ``REPLAN_FRACTION`` of the plan, within the first epoch) and sets the steps again for
what is left of the budget; the schedule, the Lookahead and progressive resizing follow the new length
from that step on (the learning rate moves by the small change of the run's length, once). Ultralytics'
``time`` argument re-estimates the same way, from its epochs; here the unit is the step, so a short budget
is met within a few percent.

The plan in force is written into the run's ``config.yaml`` and every checkpoint: ``--resume`` continues the
same steps, i.e. it trains for what is left of the budget, bit-exact; a checkpoint from before the
correction resumes with the plan it was written under (:func:`adopt_checkpoint_plan`).
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
from .callbacks import Callback
from .optim import build_scheduler
from .state import Parts, TrainState
from .step import train_step

WARMUP_STEPS = 2  # kernel selection, allocator warm-up: not timed
TIMED_STEPS = 4  # a first estimate: Replan corrects it from the run's own steps
MARGIN = 0.02  # of the budget, for what the plan cannot time (the last log lines, a slower step here and there)
REPLAN_FRACTION = 0.1  # the plan is corrected once, from the run's own steps, after this share of them
MIN_MEASURED = 4  # ... and after at least this many measured steps (the first one is not measured)


def _step_clock() -> float:
    """What Replan times the run's own steps with: ``time.perf_counter`` (the tests give it fixed costs)."""
    return time.perf_counter()


@dataclass
class Plan:
    budget: float  # seconds
    spent: float  # seconds gone before training starts (timing the steps included)
    step_seconds: float
    val_seconds: float  # one validation pass
    steps: int
    epochs: int
    validations: int
    started: float = 0.0  # time.perf_counter() when the budget's clock started

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
    has_val = len(parts.data.val_x) > 0
    steps = _fit_steps(budget * (1 - MARGIN) - spent, 0, step_s, val_s if has_val else 0.0, n, t.val_every)
    epochs = max(1, math.ceil(steps / n))
    config_epochs, t.epochs, t.steps = t.epochs, epochs, steps
    t.val_every = min(t.val_every, epochs)
    fit_schedule_to_epochs(cfg, config_epochs, say=log)  # an absolute warm-up keeps its share of the run
    p = Plan(budget, spent, step_s, val_s, steps, epochs, _validations(epochs, t.val_every) if has_val else 0,
             started)
    log(p.line())
    return p


def _fit_steps(left: float, done: int, step_s: float, val_s: float, n: int, val_every: int) -> int:
    """The most steps (more than ``done``, at least one more) whose remaining cost fits in ``left`` seconds: the
    steps after ``done`` at ``step_s`` each and the validations of the epochs after the current one (the
    current one's included) at ``val_s``. The cost grows with the steps: bisection."""
    first_epoch = done // n

    def cost(steps: int) -> float:
        last = math.ceil(steps / n)
        vals = _validations(last, val_every) - _validations(first_epoch, val_every)
        return (steps - done) * step_s + vals * val_s

    lo, hi = done + 1, done + max(1, int(left / step_s))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid - 1)
    return lo


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


class Replan(Callback):
    """Corrects the plan once, from the run's own steps (see the module's docstring). Made by ``fit`` for a
    run it has just planned; a resumed run keeps the plan it was saved with."""

    def __init__(self, p: Plan, n_batches: int, log=lambda s: None):
        self.plan, self.log, self.stamps = p, log, []
        at = max(MIN_MEASURED + 1, round(REPLAN_FRACTION * p.steps))
        self.at = at if at < min(n_batches, p.steps) else None  # within the first epoch, before the end

    def step_end(self, parts: Parts, state: TrainState, step: int) -> None:
        if self.at is None or state.global_step > self.at:
            return
        self.stamps.append(_step_clock())
        if state.global_step == self.at:
            gaps = sorted(b - a for a, b in zip(self.stamps, self.stamps[1:]))
            measured = gaps[len(gaps) // 2] if gaps else 0.0  # the median: one slow step does not size the run
            if measured > 0:
                replan(parts, state, self.plan, measured, self.log)


def replan(parts: Parts, state: TrainState, p: Plan, step_s: float, log=lambda s: None) -> None:
    """Set the run's steps again for what is left of the budget at a measured ``step_s``, and rebuild what
    depends on the run's length, mid-run: the schedule (advanced to the step reached), the Lookahead's ramp,
    progressive resizing, the validation interval. Rewrites config.yaml; the next checkpoint carries it."""
    cfg, t, n = parts.cfg, parts.cfg.train, len(parts.batches)
    done, was = state.global_step, t.steps
    left = p.budget * (1 - MARGIN) - (time.perf_counter() - p.started)
    has_val = len(parts.data.val_x) > 0
    steps = _fit_steps(left, done, step_s, p.val_seconds if has_val else 0.0, n, t.val_every)
    p.step_seconds, p.steps = step_s, steps
    if steps == was:
        log(f"time budget: {step_s * 1e3:.0f} ms a step measured over the first {done} steps: the plan holds "
            f"({steps} steps)")
        return
    t.steps, t.epochs = steps, max(1, math.ceil(steps / n))
    t.val_every = min(t.val_every, t.epochs)
    for g in parts.optimizer.param_groups:  # the peak the schedules are built from (one-cycle's, the others')
        g["lr"] = g.get("max_lr", g.get("initial_lr", g["lr"]))
    scheduler, per_step = build_scheduler(parts.optimizer, cfg.optim, t.epochs, n, total_steps=t.steps)
    for _ in range(done if per_step else state.epoch):
        scheduler.step()
    parts.scheduler, parts.per_step = scheduler, per_step
    if parts.lookahead is not None:
        parts.lookahead.total_steps = max(1, steps)
    augment = getattr(parts.batches, "augment", None)
    if augment is not None and augment.epochs is not None:
        augment.epochs = t.epochs
    if parts.run_dir is not None:
        cfg.save(parts.run_dir / "config.yaml")
    log(f"time budget: {step_s * 1e3:.0f} ms a step measured over the first {done} steps: {was} -> {steps} "
        f"steps ({t.epochs} epoch(s))")


def adopt_checkpoint_plan(cfg, checkpoint: dict | None, log=lambda s: None) -> None:
    """A budgeted run resumes with the plan its checkpoint was written under, which is config.yaml's unless the
    run was stopped between a correction of the plan and the next checkpoint."""
    if not checkpoint or not cfg.train.time_budget:
        return
    saved = (checkpoint.get("config") or {}).get("train") or {}
    steps, epochs = saved.get("steps"), saved.get("epochs")
    if steps and (steps, epochs) != (cfg.train.steps, cfg.train.epochs):
        log(f"time budget: the checkpoint's plan ({steps} steps) was written before config.yaml's "
            f"({cfg.train.steps}): resuming with the checkpoint's")
        cfg.train.steps, cfg.train.epochs = steps, epochs
        cfg.train.val_every = saved.get("val_every", cfg.train.val_every)
