"""The training loop: ``train_one_epoch``, ``evaluate`` and ``fit``.

``fit`` owns the run directory (config, metrics, weights, checkpoints, summary);
the per-epoch and per-batch work stays in small functions that fit on a screen.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..config import RunConfig
from ..data import CifarData, load_data
from ..data.dataset import apply_data_defaults
from ..data.augment import BatchAugment
from ..data.loader import DeviceBatches, step_seed
from ..data.streaming import make_batches
from ..errors import CheckpointError, CifarlabError, ConfigError
from ..evaluation.inference import TTA_VIEWS, evaluate, predict_logits, tta_logits  # noqa: F401
from ..models import build_model, count_parameters
from . import distributed as dist
from ..io import atomic_write_text
from .checkpoint import load_into, save_checkpoint, save_weights, state_dict_cpu, unwrap
from .ema import Lookahead, ModelEMA
from .optim import apply_decoupled_wd, build_optimizer, build_scheduler
from .resume import existing_run_message, find_checkpoint, is_temp_file, run_files, set_aside_unreadable
from .runtime import Runtime, maybe_compile, process_age, setup_runtime

if TYPE_CHECKING:
    from ..trackers import Tracker

METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


class NonFiniteLoss(CifarlabError):
    """The loss became NaN or infinite (``--nan-policy stop``)."""

    exit_code = 3  # not a usage error (2): the input was valid, the optimization diverged


class Interrupted(CifarlabError):
    """SIGINT / SIGTERM: the run stopped after a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "terminated by signal N": 130, 143


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed inside the current epoch (mid-epoch checkpoints)
    global_step: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0
    images_seen: int = 0
    skipped_batches: int = 0
    history: list[dict] = field(default_factory=list)
    partial: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss sum, correct, seen so far this epoch


def whitening_sample(n: int, k: int, seed: int) -> torch.Tensor:
    """Indices of ``k`` of ``n`` training images, drawn at random (seeded) for a data-dependent init.

    The training split is stored in file order, i.e. sorted by class in an image folder: its first 5000
    images would be airplanes and automobiles only, and whitening filters fitted to them would favour
    their smooth skies and roads.
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against hard labels (N,) or soft targets (N, C) from mixup / cutmix.

    ``weight`` (C,) weights each class's terms; the mean is over the weights, as ``F.cross_entropy``'s.
    """
    if target.ndim == 1:
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)
    if label_smoothing:
        target = target * (1 - label_smoothing) + label_smoothing / logits.shape[1]
    if weight is None:
        return torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
    wt = target * weight
    return torch.sum(-wt * F.log_softmax(logits, dim=1)) / wt.sum()


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``n / (C * n_c)`` per class (scikit-learn's ``class_weight="balanced"``): each class weighs the same
    in the loss whatever its number of images; a class with no training image gets weight 0."""
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.float()


# --------------------------------------------------------------------------- epoch
def train_one_epoch(model: nn.Module, batches: DeviceBatches, optimizer: torch.optim.Optimizer, scheduler,
                    per_step_sched: bool, rt: Runtime, cfg: RunConfig, state: TrainState, epoch: int,
                    ema: ModelEMA | None = None, on_step: Callable[[int], None] | None = None,
                    mix: Callable | None = None, lookahead: Lookahead | None = None,
                    class_weight: torch.Tensor | None = None) -> tuple[float, float]:
    """One pass over the training batches; returns (mean loss, accuracy) over the epoch.

    ``class_weight`` (C,) on the device weights the loss per class (``train.class_weights``)."""
    t = cfg.train
    model.train()
    # Running sums stay on the device (no per-step sync); a mid-epoch resume restores them from the checkpoint.
    loss_sum = torch.tensor(state.partial[0] if state.step else 0.0, device=rt.device, dtype=torch.float64)
    correct = torch.tensor(int(state.partial[1]) if state.step else 0, device=rt.device, dtype=torch.int64)
    seen = torch.tensor(int(state.partial[2]) if state.step else 0, device=rt.device, dtype=torch.int64)
    state.running = (loss_sum, correct, seen)
    # First step (1-based) with a non-finite loss, 0 = none: kept on the device, read only at log points and
    # before any checkpoint (see fit), so no weights from after a bad step are ever written.
    bad = torch.zeros((), device=rt.device, dtype=torch.int64)
    state.bad = bad
    scaler = rt.scaler
    bar = tqdm(total=len(batches), initial=state.step, desc=f"epoch {epoch + 1}/{t.epochs}", unit="batch",
               leave=False, disable=None if dist.is_main() else True, dynamic_ncols=True)
    for step, x, y in batches.epoch(epoch, start_step=state.step):
        # Dropout and other model randomness replay exactly from (seed, epoch, step): resume is bit-exact.
        torch.manual_seed(step_seed(t.seed + 1, epoch, step, dist.rank()))
        target = y
        if mix is not None:
            x, target = mix(x, y, epoch, step)
        with rt.autocast():
            logits = model(x)
            loss = soft_cross_entropy(logits.float(), target, t.label_smoothing, class_weight)
        finite = torch.isfinite(loss)
        if t.nan_policy == "skip-batch" and dist.any_rank(~finite):  # a host sync only under this policy
            optimizer.zero_grad(set_to_none=True)
            state.skipped_batches += 1
        else:
            bad.masked_fill_((bad == 0) & ~finite, step + 1)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            apply_decoupled_wd(optimizer)
            scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
            scaler.update()
            if lookahead is not None:
                lookahead.step(model, state.global_step + 1)
            if ema is not None and (state.global_step + 1) % t.ema_every == 0:
                ema.update(model)
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        if per_step_sched:
            scheduler.step()
        state.step = step + 1
        state.global_step += 1
        state.images_seen += len(y) * dist.world_size()
        if (step + 1) % t.log_every == 0 or step + 1 == len(batches):
            check_finite(state, epoch, t.nan_policy)
            n = max(1, int(seen))
            bar.set_postfix(loss=f"{float(loss_sum) / n:.4f}", acc=f"{int(correct) / n:.3f}", refresh=False)
        bar.update(1)
        if on_step is not None:
            on_step(step + 1)
    bar.close()
    check_finite(state, epoch, t.nan_policy)
    totals = dist.all_reduce_sum(torch.stack([loss_sum, correct.double(), seen.double()]))
    n = max(1.0, float(totals[2]))
    return float(totals[0]) / n, float(totals[1]) / n


def check_finite(state: TrainState, epoch: int, nan_policy: str) -> None:
    """Raise NonFiniteLoss if a step of this epoch had a non-finite loss (one host sync)."""
    bad = getattr(state, "bad", None)
    if nan_policy == "stop" and bad is not None and (bad_step := dist.max_over_ranks(bad)):  # all ranks stop
        raise NonFiniteLoss(f"non-finite loss in epoch {epoch + 1} at step {bad_step} (--nan-policy stop); the run "
                            f"stopped and its last checkpoint, written before that step, is kept")


# --------------------------------------------------------------------------- run dir
def default_run_name(cfg: RunConfig) -> str:
    return f"{cfg.model.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(out: str | Path, name: str | None, cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    """Check the run directory's name; nothing is created or deleted until the run writes (``_open_run_dir``)."""
    run_dir = Path(out) / (name or default_run_name(cfg))
    if run_dir.exists() and not run_dir.is_dir():
        raise CifarlabError(f"run directory {run_dir} exists and is not a folder")
    if run_dir.exists() and run_files(run_dir) and not resume and not overwrite:
        raise CifarlabError(existing_run_message(run_dir))
    return run_dir


def _open_run_dir(run_dir: Path, clear: bool, keep: tuple[str, ...] = ()) -> None:
    """Create the run directory (or empty it for --overwrite) once data, model and checkpoint are known good."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for f in run_dir.iterdir():
            # Temp files of writes a SIGKILL cut short are garbage: the file they were meant to replace is whole.
            if f.is_file() and ((clear and f.name not in keep) or is_temp_file(f)):
                f.unlink()
    except OSError as e:
        raise CifarlabError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None


def weights_meta(cfg: RunConfig, data: CifarData, model: nn.Module, epoch: int, val_acc: float) -> dict:
    from ..models.pretrained import input_norm, input_size

    mean, std = input_norm(cfg, data.mean, data.std)
    return {"model": cfg.model.name, "hparams": cfg.model.params, "num_classes": data.num_classes,
            "classes": data.classes, "image_size": cfg.data.image_size, "input_size": input_size(cfg),
            "mean": mean, "std": std, "epoch": epoch, "val_acc": val_acc, "params": count_parameters(unwrap(model)),
            # Model selection scores one view; evaluate and predict default to the run's train.tta.
            "val_tta": "none", "tta": cfg.train.tta}


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s.get("cuda"):
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _SignalGuard:
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


# --------------------------------------------------------------------------- fit
def fit(cfg: RunConfig, out_dir: str | Path = "runs", name: str | None = None, *, data: CifarData | None = None,
        resume: bool = False, overwrite: bool = False,
        on_epoch_end: Callable[[int, dict], None] | None = None, quiet: bool = False,
        trackers: Iterable[Tracker] | None = None) -> dict:
    """Train a model as configured; returns the run summary (also written to ``summary.json``).

    ``on_epoch_end(epoch, row)`` is called after each epoch with the metrics row; it may raise
    (e.g. ``optuna.TrialPruned``) to stop the run after its files are written.
    ``trackers`` (see :mod:`cifarlab.trackers`) are started with the run and get every epoch's row on
    rank 0; the caller finishes them (``with Trackers([...]) as trackers: fit(..., trackers=trackers)``).
    Under ``torchrun`` every rank calls ``fit``; the caller ends with ``distributed.cleanup()``.
    """
    dist.init()
    t = cfg.train
    run_dir, error, exc = None, None, None
    if dist.is_main():
        try:
            run_dir = prepare_run_dir(out_dir, name, cfg, resume, overwrite)
        except CifarlabError as e:
            error, exc = str(e), e
    run_dir, error = dist.broadcast_object((run_dir, error))  # rank 0 picks the (timestamped) name for all
    if error is not None:
        raise exc or CifarlabError(error)
    ckpt_state, ckpt_path, ckpt_note = None, None, None
    if resume:  # last.pt, else the previous one, else none: the run starts again (train/resume.py)
        ckpt_state, ckpt_path, ckpt_note = find_checkpoint(run_dir)
    log = (lambda *a: None) if quiet or not dist.is_main() else tqdm.write
    if ckpt_note:
        log(ckpt_note)
    rt = setup_runtime(t, cfg.model.name)
    if dist.world_size() > 1:
        rt.device = dist.device_for_rank(rt.device)
    seed_everything(t.seed)

    data = data if data is not None else load_data(cfg.data, rt.device)
    apply_data_defaults(cfg, data)  # data.image_size from the images, when the config leaves it to them
    if data.skipped:
        log(f"skipped {data.skipped} unreadable image(s) (--skip-bad-images)")
    if data.info.get("streaming"):
        log(f"streaming: the images ({data.info['bytes'] / 2**20:.0f} MiB) exceed the device's memory budget "
            f"(data.device_memory); batches are read from the decode cache as training runs")
    model = build_model(cfg, data.num_classes)
    if ckpt_state is None:  # pretrained / model.weights; a resumed run loads its own checkpoint instead
        from ..models.pretrained import load_initial_weights

        if (line := load_initial_weights(model, cfg, data.num_classes)) is not None:
            log(line)
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_params = count_parameters(model)
    augment = BatchAugment(cfg.data, len(data.train_x), t.seed, epochs=t.epochs)
    from ..models.pretrained import input_norm

    mean, std = input_norm(cfg, data.mean, data.std)  # the pretrained weights' normalization, else the data's
    train_batches = make_batches(data.train_x, data.train_y, t.batch_size, mean=mean, std=std,
                                  device=rt.device, shuffle=True, drop_last=len(data.train_x) >= t.batch_size,
                                  augment=augment, seed=t.seed, channels_last=rt.channels_last,
                                  rank=dist.rank(), world_size=dist.world_size())
    if len(train_batches) == 0:
        raise ConfigError(f"train.batch_size={t.batch_size} leaves no batch for {len(data.train_x)} images per process")
    if ckpt_state is None and hasattr(model, "init_whitening"):  # data-dependent init (speednet); resume loads it
        pick = whitening_sample(len(data.train_x), 5000, t.seed)
        model.init_whitening(train_batches.normalize(data.train_x[pick].to(rt.device)))
    lr = cfg.optim.lr * dist.lr_scale(cfg.optim.lr_scale_rule)
    optimizer = build_optimizer(model, cfg.optim, lr)
    scheduler, per_step = build_scheduler(optimizer, cfg.optim, t.epochs, len(train_batches))
    ema = ModelEMA(model, t.ema) if t.ema > 0 else None
    lookahead = Lookahead(model, t.lookahead, t.lookahead_every, t.epochs * len(train_batches)) if t.lookahead else None
    from .finetune import build_finetune

    finetune = build_finetune(model, t)  # freeze_epochs / freeze_bn, None when off
    from .mix import build_mix  # mixup / cutmix, when configured

    mix = build_mix(cfg.data, data.num_classes, t.seed)
    class_weight = (balanced_class_weights(data.train_y, data.num_classes).to(rt.device)
                    if t.class_weights == "balanced" else None)

    state = TrainState()
    if ckpt_state is not None:
        if ckpt_state.get("model_name") != cfg.model.name or ckpt_state.get("num_classes") != data.num_classes:
            raise CheckpointError(f"{ckpt_path} is from model {ckpt_state.get('model_name')!r} with "
                                  f"{ckpt_state.get('num_classes')} classes, not {cfg.model.name!r} with "
                                  f"{data.num_classes}")
        try:
            load_into(model, ckpt_state["model"], str(ckpt_path))
            optimizer.load_state_dict(ckpt_state["optimizer"])
            scheduler.load_state_dict(ckpt_state["scheduler"])
            if ema is not None and ckpt_state.get("ema") is not None:
                load_into(ema.module, ckpt_state["ema"], "EMA weights")
                # AveragedModel copies the weights on its first update instead of averaging: restore its count.
                ema.averaged.n_averaged.fill_(int(ckpt_state.get("ema_updates", 1)))
            if lookahead is not None:
                lookahead.load_state_dict(ckpt_state["lookahead"])
            if rt.scaler.is_enabled() and ckpt_state.get("scaler"):  # fp16: the loss scale it had reached
                rt.scaler.load_state_dict(ckpt_state["scaler"])
            state = TrainState(**ckpt_state["train_state"])
            if not dist.is_main():  # the saved partial sums cover every rank; rank 0 alone resumes with them
                state.partial = [0.0, 0.0, 0.0]
            set_rng_state(ckpt_state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"{ckpt_path} does not fit this run or is damaged "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        log(f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.step}")

    train_model = maybe_compile(model, t.compile)
    train_model = dist.wrap_ddp(train_model, rt.device)
    if dist.is_main():
        # A resume that found no checkpoint starts over: the files of the run it replaces go, but never
        # config.yaml, which --resume needs should this start be killed too (it is rewritten just below).
        restart = resume and ckpt_state is None
        _open_run_dir(run_dir, clear=(overwrite and not resume) or restart, keep=("config.yaml",) if restart else ())
        set_aside_unreadable(run_dir, ckpt_path)
        cfg.save(run_dir / "config.yaml")
        if ckpt_state is None:
            _write_metrics_header(run_dir / "metrics.csv")
        else:  # rows a killed process wrote after its last checkpoint go: metrics.csv matches the checkpoint
            _write_metrics(run_dir / "metrics.csv", state.history)
        for tracker in trackers or ():
            tracker.start(run_dir, cfg.to_dict(), resumed=ckpt_state is not None)
    log(f"run {run_dir} | {cfg.model.name} {n_params / 1e6:.2f}M params | {rt.device} {rt.precision}"
        f"{' channels-last' if rt.channels_last else ''} | {len(data.train_x)} train / {len(data.val_x)} val"
        f"{f' | {dist.world_size()} processes' if dist.world_size() > 1 else ''}")

    def checkpoint() -> None:
        check_finite(state, state.epoch, t.nan_policy)  # never replace the last good checkpoint with bad weights
        running = getattr(state, "running", None)
        if running is not None and state.step and dist.world_size() > 1:  # mid-epoch: sums over all ranks
            running = tuple(dist.all_reduce_sum(r) for r in running)
        if dist.is_main():
            save_checkpoint(run_dir / "last.pt", {
                "model": state_dict_cpu(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "ema": state_dict_cpu(ema.module) if ema else None,
                "ema_updates": int(ema.averaged.n_averaged) if ema else 0,
                "lookahead": lookahead.state_dict() if lookahead else None,
                "scaler": rt.scaler.state_dict() if rt.scaler.is_enabled() else None,
                "train_state": _train_state_dict(state, running), "rng": rng_state(), "model_name": cfg.model.name,
                "num_classes": data.num_classes, "config": cfg.to_dict()})
        dist.barrier()

    first_step_done = False  # its log line is the start-up time that benchmarks/throughput.py reads

    def on_step(step: int) -> None:
        nonlocal first_step_done
        if not first_step_done:
            first_step_done = True
            log(f"first training step done {process_age():.1f} s after start")
        stop = guard.signum is not None
        if dist.world_size() > 1:  # ranks agree where the loop syncs anyway, then stop at the same step
            stop = (step % t.log_every == 0 or step == len(train_batches)) and dist.any_rank(stop)
        if stop:
            checkpoint()
            signum = guard.signum or signal.SIGTERM
            raise Interrupted(f"stopped by {signal.Signals(signum).name} in epoch {state.epoch + 1} at step "
                              f"{step}; checkpoint written. Resume with: cifarlab train --resume {run_dir}",
                              signum)
        if t.checkpoint_every_steps and state.global_step % t.checkpoint_every_steps == 0 and step < len(train_batches):
            checkpoint()

    eval_model = ema.module if ema is not None else model
    with _SignalGuard() as guard:
        while state.epoch < t.epochs:
            epoch = state.epoch
            t0 = time.perf_counter()
            if finetune is not None:
                finetune.start_epoch(epoch)
            if hasattr(model, "start_epoch"):  # per-epoch model settings (speednet: the stem bias's freeze)
                model.start_epoch(epoch)
            train_loss, train_acc = train_one_epoch(train_model, train_batches, optimizer, scheduler, per_step, rt,
                                                    cfg, state, epoch, ema, on_step, mix, lookahead,
                                                    class_weight)
            if lookahead is not None and epoch + 1 == t.epochs:
                lookahead.finish(model)  # the run ends on the slow weights
            lr_now = optimizer.param_groups[0]["lr"]
            if not per_step:
                scheduler.step()
            seconds = time.perf_counter() - t0
            state.train_seconds += seconds
            row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": "",
                   "val_acc": "", "lr": lr_now, "seconds": round(seconds, 3)}
            if ((epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs) and len(data.val_x):
                val_loss, val_acc = _validate(eval_model, data, train_batches, rt, t)
                row.update(val_loss=val_loss, val_acc=val_acc)
                if val_acc > state.best_acc:  # val_acc is reduced over ranks: every rank agrees
                    state.best_acc, state.best_epoch = val_acc, epoch + 1
                    if dist.is_main():
                        save_weights(run_dir / "best.safetensors", eval_model,
                                     weights_meta(cfg, data, eval_model, epoch + 1, val_acc))
            state.epoch, state.step = epoch + 1, 0
            state.history.append(row)
            if dist.is_main():
                _append_metrics(run_dir / "metrics.csv", row)
                for tracker in trackers or ():
                    tracker.log_epoch(row)
            checkpoint()
            log(_epoch_line(row, t.epochs))
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)

    if not len(data.val_x) and dist.is_main():  # no validation split: keep the final weights as "best"
        save_weights(run_dir / "best.safetensors", eval_model, weights_meta(cfg, data, eval_model, t.epochs, float("nan")))
    summary = {
        "run_dir": str(run_dir), "model": cfg.model.name, "params": n_params, "epochs": state.epoch,
        "best_val_acc": state.best_acc if state.best_acc >= 0 else None, "best_epoch": state.best_epoch,
        "final_val_acc": next((r["val_acc"] for r in reversed(state.history) if r["val_acc"] != ""), None),
        "train_seconds": round(state.train_seconds, 2),
        "images_per_second": round(state.images_seen / state.train_seconds, 1) if state.train_seconds else None,
        "device": str(rt.device), "precision": rt.precision, "world_size": dist.world_size(),
        "train_images": len(data.train_x), "val_images": len(data.val_x), "classes": data.classes,
        "skipped_images": data.skipped, "skipped_batches": state.skipped_batches,
        "data_source": data.source, "val_tta": "none", "test_tta": t.tta,
    }
    if dist.is_main():
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        log(f"done: best val acc {summary['best_val_acc'] if summary['best_val_acc'] is not None else float('nan'):.4f} "
            f"(epoch {state.best_epoch}, no tta; evaluate uses tta {t.tta}) in {state.train_seconds:.0f}s -> {run_dir}")
    if guard.signum is not None:  # it came after the last step: the run is finished and written, now stop
        log(f"{signal.Signals(guard.signum).name} after the last step: the run is finished; stopping")
        guard.redeliver()
    return summary


def _train_state_dict(state: TrainState, running: tuple | None = None) -> dict:
    d = dataclasses.asdict(state)
    running = running if running is not None else getattr(state, "running", None)
    if state.step and running is not None:
        d["partial"] = [float(running[0]), float(running[1]), float(running[2])]
    else:
        d["partial"] = [0.0, 0.0, 0.0]
    return d


def _validate(model, data, batches_like, rt, t) -> tuple[float, float]:
    x, y = data.val_x, data.val_y
    if dist.world_size() > 1:  # each rank scores its shard; sums are reduced
        x, y = x[dist.rank()::dist.world_size()], y[dist.rank()::dist.world_size()]
    logits = predict_logits(model, x, batches_like, rt, t.eval_batch_size)
    yy = y.to(logits.device)
    sums = torch.stack([F.cross_entropy(logits, yy, reduction="sum").double(),
                        (logits.argmax(1) == yy).sum().double(), torch.tensor(float(len(yy)), dtype=torch.float64,
                                                                              device=logits.device)])
    sums = dist.all_reduce_sum(sums)
    n = max(1.0, float(sums[2]))
    return float(sums[0]) / n, float(sums[1]) / n


def _write_metrics_header(path: Path) -> None:
    atomic_write_text(path, ",".join(METRIC_FIELDS) + "\n")


def _append_metrics(path: Path, row: dict) -> None:
    """Rewrite metrics.csv atomically so that it always matches the checkpoint's history."""
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < row["epoch"]]
    rows.append(row)
    _write_metrics(path, rows)


def _write_metrics(path: Path, rows: list[dict]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else repr(v)
        return str(v)

    text = ",".join(METRIC_FIELDS) + "\n" + "".join(
        ",".join(fmt(r.get(k, "")) for k in METRIC_FIELDS) + "\n" for r in rows)
    atomic_write_text(path, text)


def _epoch_line(row: dict, epochs: int) -> str:
    val = f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}" if row["val_acc"] != "" else ""
    return (f"epoch {row['epoch']:>3}/{epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
            f"{val} | lr {row['lr']:.2e} | {row['seconds']:.1f}s")
