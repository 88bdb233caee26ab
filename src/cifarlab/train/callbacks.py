"""What happens around the epochs of a run, as callbacks of :func:`cifarlab.train.loop.run_epochs`.

A callback has three hooks, each optional: ``epoch_start(parts, state, epoch)``, ``step_end(parts, state,
step)`` (after each training step; ``step`` counts the epoch's steps done) and ``epoch_end(parts, state,
row)`` (after the epoch's validation, with its metrics row). They run in list order. :func:`default_callbacks`
is the list ``fit`` uses: freezing, signals and mid-epoch checkpoints, best weights, the metrics CSV,
trackers, the end-of-epoch checkpoint, the log line, and the caller's ``on_epoch_end`` (pruning).
"""

from __future__ import annotations

import csv
import math
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..io import atomic_write_text
from ..models import count_parameters
from ..models.pretrained import input_norm, input_size
from . import distributed as dist
from .checkpoint import save_checkpoint, save_weights, state_dict_cpu, unwrap
from .runtime import process_age
from .state import Interrupted, Parts, TrainState, check_finite, rng_state, train_state_dict

if TYPE_CHECKING:
    from ..trackers import Tracker

METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


class Callback:
    def epoch_start(self, parts: Parts, state: TrainState, epoch: int) -> None:
        pass

    def step_end(self, parts: Parts, state: TrainState, step: int) -> None:
        pass

    def epoch_end(self, parts: Parts, state: TrainState, row: dict) -> None:
        pass


# --------------------------------------------------------------------------- signals
class SignalGuard:
    """Turn SIGINT / SIGTERM into a flag checked after each step, so the step finishes and a checkpoint is written.

    A signal no step saw (it came after the last one) is handed on once the handlers from before are back:
    at once when the block ends in an exception (``on_epoch_end``'s ``TrialPruned``, say), else by the caller
    through :meth:`redeliver` once it has written what it has to."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, exc_type, exc, tb):
        for s, h in self._old.items():
            signal.signal(s, h)
        if exc_type is not None and not issubclass(exc_type, (Interrupted, KeyboardInterrupt)):
            self.redeliver()

    def redeliver(self) -> None:
        if self.signum is not None:
            signum, self.signum = self.signum, None
            signal.raise_signal(signum)


class StopOnSignal(Callback):
    """After each step: a SIGINT / SIGTERM seen writes a checkpoint and stops the run (``Interrupted``);
    ``train.checkpoint_every_steps`` writes mid-epoch checkpoints. Logs when the first step is done."""

    def __init__(self, guard: SignalGuard, checkpoint: Checkpoint, log: Callable[[str], None]):
        self.guard, self.checkpoint, self.log = guard, checkpoint, log
        self.first_step_done = False  # its log line is the start-up time that benchmarks/throughput.py reads

    def step_end(self, parts: Parts, state: TrainState, step: int) -> None:
        t = parts.cfg.train
        if not self.first_step_done:
            self.first_step_done = True
            self.log(f"first training step done {process_age():.1f} s after start")
        n = len(parts.batches)
        stop = self.guard.signum is not None
        if dist.world_size() > 1:  # ranks agree where the loop syncs anyway, then stop at the same step
            stop = (step % t.log_every == 0 or step == n) and dist.any_rank(stop)
        if stop:
            self.checkpoint.write(parts, state)
            signum = self.guard.signum or signal.SIGTERM
            raise Interrupted(f"stopped by {signal.Signals(signum).name} in epoch {state.epoch + 1} at step "
                              f"{step}; checkpoint written. Resume with: cifarlab train --resume {parts.run_dir}",
                              signum)
        if t.checkpoint_every_steps and state.global_step % t.checkpoint_every_steps == 0 and step < n:
            self.checkpoint.write(parts, state)


# --------------------------------------------------------------------------- per epoch
class Freezing(Callback):
    """Per-epoch settings: fine-tuning's frozen backbone (``train.freeze_epochs``) and the model's own
    (a model spec with ``start_epoch``: speednet's stem bias freeze)."""

    def epoch_start(self, parts: Parts, state: TrainState, epoch: int) -> None:
        if parts.finetune is not None:
            parts.finetune.start_epoch(epoch)
        if parts.spec.start_epoch:
            parts.model.start_epoch(epoch)


class BestWeights(Callback):
    """Keep the weights of the best validation accuracy as ``best.safetensors`` (+ its JSON sidecar)."""

    def epoch_end(self, parts: Parts, state: TrainState, row: dict) -> None:
        if row["val_acc"] != "" and row["val_acc"] > state.best_acc:  # reduced over ranks: every rank agrees
            state.best_acc, state.best_epoch = row["val_acc"], row["epoch"]
            if dist.is_main():
                save_weights(parts.run_dir / "best.safetensors", parts.eval_model,
                             weights_meta(parts, row["epoch"], row["val_acc"]))


class EarlyStop(Callback):
    """``train.early_stop``: end the run after that many validations in a row without a gain of at least
    ``train.early_stop_min_delta`` over the best so far. Read from the history alone, so a resumed run counts
    as the uninterrupted one did; the reason goes to the summary."""

    def epoch_end(self, parts: Parts, state: TrainState, row: dict) -> None:
        t = parts.cfg.train
        if not t.early_stop or row["val_acc"] == "" or row["epoch"] >= t.epochs:
            return
        if (reason := early_stop_reason(state.history, t.early_stop, t.early_stop_min_delta)):
            state.stop_reason = reason


def early_stop_reason(history: list[dict], patience: int, min_delta: float) -> str:
    """Why to stop now, or "": the validations since the last one that beat the best before it by
    ``min_delta`` number ``patience`` or more."""
    accs = [(r["epoch"], float(r["val_acc"])) for r in history if r.get("val_acc") not in ("", None)]
    best, best_epoch, since = -1.0, 0, 0
    for epoch, acc in accs:
        if acc > best + min_delta or best < 0:
            best, best_epoch, since = max(best, acc), epoch, 0
        else:
            since += 1
    if since >= patience:
        return (f"early stop: {since} validation(s) without a gain of {min_delta:g} over {best:.4f} "
                f"(epoch {best_epoch}); train.early_stop={patience}")
    return ""


class MetricsCSV(Callback):
    def epoch_end(self, parts: Parts, state: TrainState, row: dict) -> None:
        if dist.is_main():
            append_metrics(parts.run_dir / "metrics.csv", row)


class TrackerLog(Callback):
    def __init__(self, trackers: Iterable[Tracker] | None):
        self.trackers = list(trackers or ())

    def epoch_end(self, parts: Parts, state: TrainState, row: dict) -> None:
        if dist.is_main():
            for tracker in self.trackers:
                tracker.log_epoch(row)


class Checkpoint(Callback):
    """``last.pt`` at the end of every epoch (and mid-epoch through :class:`StopOnSignal`): everything a
    bit-exact resume needs."""

    def write(self, parts: Parts, state: TrainState) -> None:
        check_finite(state, state.epoch, parts.cfg.train.nan_policy)  # never replace a good checkpoint with bad weights
        running = state.running
        if running is not None and state.step and dist.world_size() > 1:  # mid-epoch: sums over all ranks
            running = tuple(dist.all_reduce_sum(r) for r in running)
        if dist.is_main():
            ema, lookahead, scaler = parts.ema, parts.lookahead, parts.rt.scaler
            save_checkpoint(parts.run_dir / "last.pt", {
                "model": state_dict_cpu(parts.model), "optimizer": parts.optimizer.state_dict(),
                "scheduler": parts.scheduler.state_dict(), "ema": state_dict_cpu(ema.module) if ema else None,
                "ema_updates": int(ema.averaged.n_averaged) if ema else 0,
                "lookahead": lookahead.state_dict() if lookahead else None,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "train_state": train_state_dict(state, running), "rng": rng_state(),
                "model_name": parts.cfg.model.name, "num_classes": parts.data.num_classes,
                "config": parts.cfg.to_dict()})
        dist.barrier()

    def epoch_end(self, parts: Parts, state: TrainState, row: dict) -> None:
        self.write(parts, state)


class LogLine(Callback):
    def __init__(self, log: Callable[[str], None]):
        self.log = log

    def epoch_end(self, parts: Parts, state: TrainState, row: dict) -> None:
        self.log(epoch_line(row, parts.cfg.train.epochs))


class OnEpochEnd(Callback):
    """The caller's ``on_epoch_end(epoch, row)``: it may raise (``optuna.TrialPruned``) to stop the run once the
    epoch's files are written."""

    def __init__(self, fn: Callable[[int, dict], None]):
        self.fn = fn

    def epoch_end(self, parts: Parts, state: TrainState, row: dict) -> None:
        self.fn(row["epoch"], row)


def default_callbacks(guard: SignalGuard, log: Callable[[str], None], trackers: Iterable[Tracker] | None,
                      on_epoch_end: Callable[[int, dict], None] | None) -> list[Callback]:
    ckpt = Checkpoint()
    cbs = [Freezing(), StopOnSignal(guard, ckpt, log), BestWeights(), EarlyStop(), MetricsCSV(), TrackerLog(trackers),
           ckpt, LogLine(log)]
    return cbs + ([OnEpochEnd(on_epoch_end)] if on_epoch_end is not None else [])


def weights_meta(parts: Parts, epoch: int, val_acc: float | None) -> dict:
    """``best.json``: what a loader needs to rebuild the model and its preprocessing from the weights alone
    (``val_acc`` null for a run without a validation split: its final weights)."""
    cfg, data = parts.cfg, parts.data
    mean, std = input_norm(cfg, data.mean, data.std)
    return {"model": cfg.model.name, "hparams": cfg.model.params, "num_classes": data.num_classes,
            "classes": data.classes, "image_size": cfg.data.image_size, "input_size": input_size(cfg),
            "mean": mean, "std": std, "epoch": epoch, "val_acc": val_acc,
            "params": count_parameters(unwrap(parts.eval_model)),
            # Model selection scores one view; evaluate and predict default to the run's train.tta.
            "val_tta": "none", "tta": cfg.train.tta}


# --------------------------------------------------------------------------- metrics.csv
def write_metrics_header(path: Path) -> None:
    atomic_write_text(path, ",".join(METRIC_FIELDS) + "\n")


def append_metrics(path: Path, row: dict) -> None:
    """Rewrite metrics.csv atomically so that it always matches the checkpoint's history."""
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < row["epoch"]]
    rows.append(row)
    write_metrics(path, rows)


def write_metrics(path: Path, rows: list[dict]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else repr(v)
        return str(v)

    text = ",".join(METRIC_FIELDS) + "\n" + "".join(
        ",".join(fmt(r.get(k, "")) for k in METRIC_FIELDS) + "\n" for r in rows)
    atomic_write_text(path, text)


def epoch_line(row: dict, epochs: int) -> str:
    val = f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}" if row["val_acc"] != "" else ""
    return (f"epoch {row['epoch']:>3}/{epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
            f"{val} | lr {row['lr']:.2e} | {row['seconds']:.1f}s")
