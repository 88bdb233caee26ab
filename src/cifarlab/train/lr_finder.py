"""The learning-rate range test: ``cifarlab lr-find --config CONFIG``.

Smith (2017), "Cyclical Learning Rates for Training Neural Networks", section 3.3, as fastai's
``Learner.lr_find`` does it (the reference for every default here): train for ``num_it`` steps
while the learning rate grows exponentially from ``start_lr`` to ``end_lr``, record the loss of
each step, smooth it with a debiased exponential moving average (``beta`` 0.98), and stop early
once the smoothed loss exceeds ``div`` (4) times its best, or is not finite: the lr has left the
range where training works. The suggestion is fastai's ``valley``: in the longest stretch where the
loss keeps falling, the lr at about half-way (61%, fastai's "1/3 + 1/6" point) of it; fastai's
``minimum`` (the lr of the lowest loss, divided by 10) and ``steep`` (the steepest descent) are
reported beside it. Like fastai, the first 10% of the steps and the last 5 are left out of the
suggestions (too early to say; the blow-up).

:func:`find_lr` works on any model and optimizer and leaves both as they were (their state dicts,
BatchNorm statistics and the RNG are restored); :func:`lr_find` builds the run's model, optimizer
and batches exactly as ``cifarlab train`` would (pretrained weights, freezing of the first epoch,
discriminative lrs, augmentation, precision) and runs the test on them.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import RunConfig
from ..io import atomic_write
from .callbacks import Freezing
from .loop import setup
from .state import TrainState
from .step import train_step


@dataclass
class LRFindResult:
    lrs: list[float]  # the lr of each step (the base lr, i.e. optim.lr; other groups keep their ratio to it)
    losses: list[float]  # raw training loss of each step
    smoothed: list[float]  # debiased exponential moving average of the losses
    suggestion: float  # fastai's valley
    suggestions: dict[str, float] = field(default_factory=dict)  # valley, minimum (min / 10), steep
    diverged: bool = False  # stopped early: the smoothed loss exceeded div x its best, or was not finite
    num_it: int = 0  # steps asked for

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", "lr", "loss", "smoothed_loss"])
        for i, (lr, loss, sm) in enumerate(zip(self.lrs, self.losses, self.smoothed)):
            w.writerow([i, repr(lr), repr(loss), repr(sm)])
        return buf.getvalue()


# --------------------------------------------------------------------------- the test
def range_test(step: Callable[[float], float], start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 200,
               beta: float = 0.98, div: float = 4.0, stop_div: bool = True) -> LRFindResult:
    """Call ``step(lr) -> loss`` for exponentially growing lrs; see the module docstring."""
    if not (0 < start_lr < end_lr) or num_it < 2:
        raise ValueError(f"need 0 < start_lr < end_lr and num_it >= 2, got {start_lr}, {end_lr}, {num_it}")
    lrs, losses, smoothed = [], [], []
    avg, best, diverged = 0.0, math.inf, False
    for i in range(num_it):
        lr = start_lr * (end_lr / start_lr) ** (i / (num_it - 1))
        loss = float(step(lr))
        avg = beta * avg + (1 - beta) * loss
        sm = avg / (1 - beta ** (i + 1))
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(sm)
        best = min(best, sm)
        if stop_div and (not math.isfinite(sm) or sm > div * best):
            diverged = True
            break
    sugg = suggest(lrs, smoothed, num_it)
    return LRFindResult(lrs, losses, smoothed, sugg["valley"], sugg, diverged, num_it)


def suggest(lrs: list[float], smoothed: list[float], num_it: int) -> dict[str, float]:
    """fastai's valley, minimum and steep suggestions on the recorded curve."""
    lo, hi = num_it // 10, len(lrs) - 5
    if hi - lo < 4:  # a curve too short to trim
        lo, hi = 0, len(lrs)
    lr = torch.tensor(lrs[lo:hi], dtype=torch.float64)
    loss = torch.tensor(smoothed[lo:hi], dtype=torch.float64)
    finite = torch.isfinite(loss)
    lr, loss = lr[finite], loss[finite]
    if len(lr) < 2:
        v = float(lr[0]) if len(lr) else float(lrs[0])
        return {"valley": v, "minimum": v / 10, "steep": v}
    out = {"valley": _valley(lr.tolist(), loss.tolist()), "minimum": float(lr[loss.argmin()]) / 10}
    grads = (loss[1:] - loss[:-1]) / (lr[1:].log() - lr[:-1].log())
    out["steep"] = float(lr[grads.argmin()])
    return out


def _valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's ``valley``: the longest strictly falling run of the loss (a longest decreasing subsequence,
    O(n^2)), and the lr 1/3 + 1/6 of the way along it."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return float(lrs[max_start + int(sections) + int(sections / 2)])


def find_lr(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy, *,
            start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 200, beta: float = 0.98, div: float = 4.0,
            stop_div: bool = True, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            scaler: torch.amp.GradScaler | None = None) -> LRFindResult:
    """The range test on ``model`` and ``optimizer``, which are restored afterwards (weights, buffers, optimizer
    state and lrs, loss scale, RNG). ``batches`` yields (inputs, targets) and is cycled if shorter than ``num_it``.
    ``step(x, y) -> loss`` takes one optimization step (a cifarlab run's is :func:`cifarlab.train.step.train_step`,
    see :func:`lr_find`); by default a plain one: forward, ``loss_fn``, backward, ``optimizer.step()``.
    Each group's lr keeps its ratio to the largest group lr (discriminative lrs); ``lrs`` are that largest."""
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    saved_scaler = copy.deepcopy(scaler.state_dict()) if scaler is not None and scaler.is_enabled() else None
    saved_rng = torch.get_rng_state()
    saved_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training
    top = max(g["lr"] for g in optimizer.param_groups)
    ratios = [g["lr"] / top if top > 0 else 1.0 for g in optimizer.param_groups]
    it: Iterator = _cycle(batches)

    def plain_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    take_step = step or plain_step

    def at_lr(lr: float) -> float:
        for g, r in zip(optimizer.param_groups, ratios):
            g["lr"] = lr * r
        return take_step(*next(it)).item()

    model.train()
    try:
        return range_test(at_lr, start_lr, end_lr, num_it, beta, div, stop_div)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)  # also the lrs of every group
        if saved_scaler is not None:
            scaler.load_state_dict(saved_scaler)
        torch.set_rng_state(saved_rng)
        if saved_cuda is not None:
            torch.cuda.set_rng_state_all(saved_cuda)
        model.train(was_training)


def _cycle(batches: Iterable) -> Iterator:
    for _ in itertools.count():
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("the lr finder got no batches")


# --------------------------------------------------------------------------- a run's model
def lr_find(cfg: RunConfig, *, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 200,
            data=None, log: Callable[[str], None] | None = None) -> LRFindResult:
    """The range test on the parts ``cifarlab train`` builds for ``cfg`` (:func:`cifarlab.train.loop.setup`:
    starting weights, whitening, the batches on the device or streamed, discriminative lrs, precision), stepping
    with the training loop's own step (class weights, mixup, clipping, decoupled decay, loss scale), as the first
    epoch would (its freezing and the model's per-epoch settings)."""
    parts = setup(cfg, data, log=log or (lambda s: None))
    for cb in (Freezing(),):
        cb.epoch_start(parts, TrainState(), 0)  # the test runs on the model as the first epoch trains it
    t = cfg.train

    def stream() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for epoch in itertools.count():
            for step, x, y in parts.batches.epoch(epoch):
                yield parts.mix(x, y, epoch, step) if parts.mix is not None else (x, y)

    try:
        # nan_policy "stop" only records a bad step: the range test itself stops on a non-finite loss.
        return find_lr(parts.model, parts.optimizer, stream(), start_lr=start_lr, end_lr=end_lr, num_it=num_it,
                       step=lambda x, y: train_step(parts, x, y, 0, nan_policy="stop").loss, scaler=parts.rt.scaler)
    finally:
        if parts.finetune is not None:
            parts.finetune.start_epoch(t.epochs)  # everything trainable again


def plot(result: LRFindResult, path: str | Path, title: str = "") -> Path:
    """Loss against lr (log scale), raw and smoothed, with the suggestions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result.lrs, result.losses, color="0.75", lw=0.8, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=1.8, label="smoothed loss")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:  # the blow-up would squash the useful part of the curve
        lo, hi = min(finite), min(max(finite), finite[0] * 1.5 if finite[0] > 0 else max(finite))
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-12), hi + 0.05 * (hi - lo + 1e-12))
    for (name, lr), color in zip(result.suggestions.items(), ("C3", "C2", "C1")):
        name = "minimum/10" if name == "minimum" else name
        ax.axvline(lr, color=color, ls="--" if name != "valley" else "-", lw=1.2, label=f"{name}: {lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optim.lr)")
    ax.set_ylabel("training loss")
    ax.set_title(title or "learning-rate range test")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path
