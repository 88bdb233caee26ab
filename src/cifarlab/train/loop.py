"""The trainer: ``setup`` builds a run's parts, ``restore`` decides once where its weights come from,
``run_epochs`` trains with callbacks (:mod:`.callbacks`), ``summarize`` writes the summary, and ``fit``
composes them. One step (:func:`cifarlab.train.step.train_step`) serves the loop and the lr finder.

``fit`` owns the run directory (config, metrics, weights, checkpoints, summary); each piece fits on a
screen, as in torchvision's references (``train_one_epoch``, ``evaluate``, ``main``) and nanoGPT's
``init_from``.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import RunConfig
from ..data import ImageData, load_data
from ..data.augment import BatchAugment
from ..data.dataset import apply_data_defaults
from ..data.loader import step_seed
from ..data.streaming import make_batches
from ..errors import CheckpointError, CifarlabError, ConfigError
from ..evaluation.inference import predict_logits
from ..io import atomic_write_text
from ..models import build_model, count_parameters, model_spec
from ..models.pretrained import input_norm, load_initial_weights
from ..coerce import parse_duration
from . import budget
from . import distributed as dist
from .callbacks import (Callback, SignalGuard, default_callbacks, weights_meta, write_metrics,
                        write_metrics_header)
from .checkpoint import load_into, save_weights
from .ema import Lookahead, ModelEMA
from .finetune import build_finetune
from .mix import build_mix
from .optim import build_optimizer, build_scheduler
from .resume import existing_run_message, find_checkpoint, is_temp_file, run_files, set_aside_unreadable
from .runtime import maybe_compile, setup_runtime
from .state import (Interrupted, NonFiniteLoss, Parts, TrainState, check_finite, seed_everything,  # noqa: F401
                    set_rng_state)
from .step import balanced_class_weights, soft_cross_entropy, train_step  # noqa: F401

if TYPE_CHECKING:
    from ..trackers import Tracker

Log = Callable[[str], None]


def whitening_sample(n: int, k: int, seed: int) -> torch.Tensor:
    """Indices of ``k`` of ``n`` training images, drawn at random (seeded) for a data-dependent init.

    The training split is stored in file order, i.e. sorted by class in an image folder: its first 5000
    images would be airplanes and automobiles only, and whitening filters fitted to them would favour
    their smooth skies and roads.
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


# --------------------------------------------------------------------------- setup
@dataclass
class Restore:
    """Where a run's weights come from, decided once (nanoGPT's ``init_from``): a checkpoint of this run
    (``--resume`` found one), else the model's initialization with the configured starting weights
    (``model.pretrained`` / ``model.weights``) and its data-dependent init (whitening)."""

    state: dict | None = None  # the checkpoint, when resuming from one
    path: Path | None = None
    note: str | None = None  # what the search for a checkpoint found, for the log

    @property
    def fresh(self) -> bool:
        return self.state is None


def find_restore(run_dir: Path, resume: bool) -> Restore:
    """last.pt, else the previous one, else none: the run starts again (train/resume.py)."""
    return Restore(*find_checkpoint(run_dir)) if resume else Restore()


def setup(cfg: RunConfig, data: ImageData | None = None, *, restore: Restore | None = None,
          log: Log = lambda s: None) -> Parts:
    """Build a run's parts from its config, with the capabilities its model spec declares. The order of the
    steps is the order the random number generators are drawn in: changing it changes every run."""
    restore = restore or Restore()
    t = cfg.train
    rt = setup_runtime(t, cfg.model.name)
    if dist.world_size() > 1:
        rt.device = dist.device_for_rank(rt.device)
    seed_everything(t.seed)
    t0 = time.perf_counter()
    data = data if data is not None else load_data(cfg.data, rt.device)
    data_seconds = time.perf_counter() - t0
    apply_data_defaults(cfg, data)  # data.image_size from the images, when the config leaves it to them
    if data.skipped:
        log(f"skipped {data.skipped} unreadable image(s) (--skip-bad-images)")
    if data.info.get("streaming"):
        log(f"streaming: the images ({data.info['bytes'] / 2**20:.0f} MiB) exceed the device's memory budget "
            f"(data.device_memory); batches are read from the decode cache as training runs")
    spec = model_spec(cfg.model.name)
    model = build_model(cfg, data.num_classes)
    if restore.fresh and (line := load_initial_weights(model, cfg, data.num_classes)) is not None:
        log(line)  # pretrained / model.weights; a resumed run loads its own checkpoint instead
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batches = _train_batches(cfg, data, rt)
    if restore.fresh and spec.whitening:  # data-dependent init (speednet); a resume loads it
        pick = whitening_sample(len(data.train_x), 5000, t.seed)
        model.init_whitening(batches.normalize(data.train_x[pick].to(rt.device)))
    parts = Parts(cfg, spec, rt, data, model, model, batches, None, None, False, data_seconds=data_seconds)
    build_optimization(parts)
    parts.finetune = build_finetune(model, t)  # freeze_epochs / freeze_bn, None when off
    parts.mix = build_mix(cfg.data, data.num_classes, t.seed)  # mixup / cutmix, when configured
    if t.class_weights == "balanced":
        parts.class_weight = balanced_class_weights(data.train_y, data.num_classes).to(rt.device)
    return parts


def build_optimization(parts: Parts) -> None:
    """The optimizer, its schedule (to ``train.steps`` when set, else ``train.epochs``), the EMA and Lookahead."""
    cfg, t, model, n = parts.cfg, parts.cfg.train, parts.model, len(parts.batches)
    total = t.steps or t.epochs * n
    parts.optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr * dist.lr_scale(cfg.optim.lr_scale_rule))
    parts.scheduler, parts.per_step = build_scheduler(parts.optimizer, cfg.optim, t.epochs, n, total_steps=t.steps)
    parts.ema = ModelEMA(model, t.ema) if t.ema > 0 else None
    parts.lookahead = Lookahead(model, t.lookahead, t.lookahead_every, total) if t.lookahead else None


def _train_batches(cfg: RunConfig, data: ImageData, rt):
    """The training batches: on the device, or streamed from the decode cache (``make_batches`` chooses)."""
    t = cfg.train
    augment = BatchAugment(cfg.data, len(data.train_x), t.seed, epochs=t.epochs)
    mean, std = input_norm(cfg, data.mean, data.std)  # the pretrained weights' normalization, else the data's
    batches = make_batches(data.train_x, data.train_y, t.batch_size, mean=mean, std=std, device=rt.device,
                           shuffle=True, drop_last=len(data.train_x) >= t.batch_size, augment=augment, seed=t.seed,
                           channels_last=rt.channels_last, rank=dist.rank(), world_size=dist.world_size())
    if len(batches) == 0:
        raise ConfigError(f"train.batch_size={t.batch_size} leaves no batch for {len(data.train_x)} images per process")
    return batches


def restore(parts: Parts, r: Restore, log: Log = lambda s: None) -> TrainState:
    """A new TrainState, or the checkpoint's: weights, optimizer, schedule, EMA, Lookahead, loss scale, RNG."""
    if r.fresh:
        return TrainState()
    ckpt, cfg, n_classes = r.state, parts.cfg, parts.data.num_classes
    if ckpt.get("model_name") != cfg.model.name or ckpt.get("num_classes") != n_classes:
        raise CheckpointError(f"{r.path} is from model {ckpt.get('model_name')!r} with {ckpt.get('num_classes')} "
                              f"classes, not {cfg.model.name!r} with {n_classes}")
    try:
        load_into(parts.model, ckpt["model"], str(r.path))
        parts.optimizer.load_state_dict(ckpt["optimizer"])
        parts.scheduler.load_state_dict(ckpt["scheduler"])
        if parts.ema is not None and ckpt.get("ema") is not None:
            load_into(parts.ema.module, ckpt["ema"], "EMA weights")
            # AveragedModel copies the weights on its first update instead of averaging: restore its count.
            parts.ema.averaged.n_averaged.fill_(int(ckpt.get("ema_updates", 1)))
        if parts.lookahead is not None:
            parts.lookahead.load_state_dict(ckpt["lookahead"])
        if parts.rt.scaler.is_enabled() and ckpt.get("scaler"):  # fp16: the loss scale it had reached
            parts.rt.scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(**ckpt["train_state"])
        if not dist.is_main():  # the saved partial sums cover every rank; rank 0 alone resumes with them
            state.partial = [0.0, 0.0, 0.0]
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{r.path} does not fit this run or is damaged "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    log(f"resuming {parts.run_dir} at epoch {state.epoch + 1}, step {state.step}")
    return state


# --------------------------------------------------------------------------- epochs
def train_one_epoch(parts: Parts, state: TrainState, epoch: int,
                    on_step: Callable[[int], None] | None = None) -> tuple[float, float]:
    """One pass over the training batches; returns (mean loss, accuracy) over the epoch."""
    t, rt, batches = parts.cfg.train, parts.rt, parts.batches
    parts.train_model.train()
    # Running sums stay on the device (no per-step sync); a mid-epoch resume restores them from the checkpoint.
    loss_sum = torch.tensor(state.partial[0] if state.step else 0.0, device=rt.device, dtype=torch.float64)
    correct = torch.tensor(int(state.partial[1]) if state.step else 0, device=rt.device, dtype=torch.int64)
    seen = torch.tensor(int(state.partial[2]) if state.step else 0, device=rt.device, dtype=torch.int64)
    state.running = (loss_sum, correct, seen)
    # Read only at log points and before any checkpoint, so no weights from after a bad step are ever written.
    bad = state.bad = torch.zeros((), device=rt.device, dtype=torch.int64)
    bar = tqdm(total=len(batches), initial=state.step, desc=f"epoch {epoch + 1}/{t.epochs}", unit="batch",
               leave=False, disable=None if dist.is_main() else True, dynamic_ncols=True)
    for step, x, y in batches.epoch(epoch, start_step=state.step):
        # Dropout and other model randomness replay exactly from (seed, epoch, step): resume is bit-exact.
        torch.manual_seed(step_seed(t.seed + 1, epoch, step, dist.rank()))
        x, target = parts.mix(x, y, epoch, step) if parts.mix is not None else (x, y)
        res = train_step(parts, x, target, state.global_step)
        if not res.applied:
            state.skipped_batches += 1
        else:
            bad.masked_fill_((bad == 0) & ~res.finite, step + 1)
            loss_sum += res.loss.double() * len(y)
            correct += (res.logits.argmax(1) == y).sum()
            seen += len(y)
        if parts.per_step:
            parts.scheduler.step()
        state.step, state.global_step = step + 1, state.global_step + 1
        state.images_seen += len(y) * dist.world_size()
        if (step + 1) % t.log_every == 0 or step + 1 == len(batches):
            check_finite(state, epoch, t.nan_policy)
            n = max(1, int(seen))
            bar.set_postfix(loss=f"{float(loss_sum) / n:.4f}", acc=f"{int(correct) / n:.3f}", refresh=False)
        bar.update(1)
        if on_step is not None:
            on_step(step + 1)
        if t.steps and state.global_step >= t.steps:  # the run's last step (train.steps): a partial last epoch
            break
    bar.close()
    check_finite(state, epoch, t.nan_policy)
    totals = dist.all_reduce_sum(torch.stack([loss_sum, correct.double(), seen.double()]))
    n = max(1.0, float(totals[2]))
    return float(totals[0]) / n, float(totals[1]) / n


def run_epochs(parts: Parts, state: TrainState, callbacks: Iterable[Callback]) -> None:
    """Train the remaining epochs; after each, validate (every ``train.val_every``) and call the callbacks."""
    t, callbacks = parts.cfg.train, list(callbacks)

    def on_step(step: int) -> None:
        for cb in callbacks:
            cb.step_end(parts, state, step)

    while state.epoch < t.epochs and not state.stop_reason:
        epoch, t0 = state.epoch, time.perf_counter() - (state.epoch_seconds if state.step else 0.0)
        state.epoch_started = t0
        for cb in callbacks:
            cb.epoch_start(parts, state, epoch)
        train_loss, train_acc = train_one_epoch(parts, state, epoch, on_step)
        if parts.lookahead is not None and epoch + 1 == t.epochs:
            parts.lookahead.finish(parts.model)  # the run ends on the slow weights
        lr_now = parts.optimizer.param_groups[0]["lr"]
        if not parts.per_step:
            parts.scheduler.step()
        seconds = time.perf_counter() - t0
        state.train_seconds += seconds
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": "",
               "val_acc": "", "lr": lr_now, "seconds": round(seconds, 3)}
        if ((epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs) and len(parts.data.val_x):
            row["val_loss"], row["val_acc"] = validate(parts)
        state.wall_seconds += time.perf_counter() - t0
        state.epoch, state.step = epoch + 1, 0
        state.history.append(row)
        for cb in callbacks:
            cb.epoch_end(parts, state, row)


def validate(parts: Parts) -> tuple[float, float]:
    """(loss, accuracy) of the eval model on the validation split, reduced over ranks."""
    x, y = parts.data.val_x, parts.data.val_y
    if dist.world_size() > 1:  # each rank scores its shard; sums are reduced
        x, y = x[dist.rank()::dist.world_size()], y[dist.rank()::dist.world_size()]
    logits = predict_logits(parts.eval_model, x, parts.batches, parts.rt, parts.cfg.train.eval_batch_size)
    yy = y.to(logits.device)
    sums = torch.stack([F.cross_entropy(logits, yy, reduction="sum").double(),
                        (logits.argmax(1) == yy).sum().double(),
                        torch.tensor(float(len(yy)), dtype=torch.float64, device=logits.device)])
    sums = dist.all_reduce_sum(sums)
    n = max(1.0, float(sums[2]))
    return float(sums[0]) / n, float(sums[1]) / n


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


def open_run(parts: Parts, r: Restore, state: TrainState, *, resume: bool, overwrite: bool,
             trackers: Iterable[Tracker] | None) -> None:
    """Rank 0 creates (or empties) the run directory, writes the config and the metrics CSV to match the
    checkpoint, and starts the trackers."""
    if not dist.is_main():
        return
    run_dir, cfg = parts.run_dir, parts.cfg
    # A resume that found no checkpoint starts over: the files of the run it replaces go, but never
    # config.yaml, which --resume needs should this start be killed too (it is rewritten just below).
    restart = resume and r.fresh
    _open_run_dir(run_dir, clear=(overwrite and not resume) or restart, keep=("config.yaml",) if restart else ())
    set_aside_unreadable(run_dir, r.path)
    cfg.save(run_dir / "config.yaml")
    if r.fresh:
        write_metrics_header(run_dir / "metrics.csv")
    else:  # rows a killed process wrote after its last checkpoint go: metrics.csv matches the checkpoint
        write_metrics(run_dir / "metrics.csv", state.history)
    for tracker in trackers or ():
        tracker.start(run_dir, cfg.to_dict(), resumed=not r.fresh)


def summarize(parts: Parts, state: TrainState, log: Log = lambda s: None) -> dict:
    """The run's summary, written to ``summary.json`` (rank 0); without a validation split the final weights
    are kept as the best."""
    cfg, data, t = parts.cfg, parts.data, parts.cfg.train
    if not len(data.val_x) and dist.is_main():
        save_weights(parts.run_dir / "best.safetensors", parts.eval_model,
                     weights_meta(parts, t.epochs, None))  # null: no validation score
    summary = {
        "run_dir": str(parts.run_dir), "model": cfg.model.name, "params": count_parameters(parts.model),
        "epochs": state.epoch, "best_val_acc": state.best_acc if state.best_acc >= 0 else None,
        "best_epoch": state.best_epoch,
        "final_val_acc": next((r["val_acc"] for r in reversed(state.history) if r["val_acc"] != ""), None),
        "train_seconds": round(state.train_seconds, 2),
        "images_per_second": round(state.images_seen / state.train_seconds, 1) if state.train_seconds else None,
        "device": str(parts.rt.device), "precision": parts.rt.precision, "world_size": dist.world_size(),
        "train_images": len(data.train_x), "val_images": len(data.val_x), "classes": data.classes,
        "skipped_images": data.skipped, "skipped_batches": state.skipped_batches,
        "data_source": data.source, "val_tta": "none", "test_tta": t.tta,
        "stopped_early": state.stop_reason or None, "wall_seconds": round(state.wall_seconds, 2),
        "time_budget_seconds": parse_duration("train.time_budget", t.time_budget) if t.time_budget else None,
    }
    if dist.is_main():
        atomic_write_text(parts.run_dir / "summary.json", json.dumps(summary, indent=2))
        if state.stop_reason:
            log(f"{state.stop_reason}: stopped after epoch {state.epoch} of {t.epochs}")
        if summary["best_val_acc"] is not None:
            chosen = (f"best val acc {summary['best_val_acc']:.4f} (epoch {state.best_epoch}, no tta; evaluate uses "
                      f"tta {t.tta})")
        else:
            chosen = f"no validation split: the final weights kept (epoch {state.epoch}; evaluate uses tta {t.tta})"
        log(f"done: {chosen} in {state.train_seconds:.0f}s -> {parts.run_dir}")
    return summary


# --------------------------------------------------------------------------- fit
def fit(cfg: RunConfig, out_dir: str | Path = "runs", name: str | None = None, *, data: ImageData | None = None,
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
    started = time.perf_counter()
    run_dir = _agreed_run_dir(out_dir, name, cfg, resume, overwrite)
    r = find_restore(run_dir, resume)
    log = (lambda *a: None) if quiet or not dist.is_main() else tqdm.write
    if r.note:
        log(r.note)
    budget.adopt_checkpoint_plan(cfg, r.state, log)
    parts = setup(cfg, data, restore=r, log=log)
    parts.run_dir = run_dir
    state = restore(parts, r, log)
    replan = []
    if cfg.train.time_budget and r.fresh and not cfg.train.steps:  # a resume keeps its plan (config.yaml)
        log(f"data loaded in {parts.data_seconds:.1f}s (not counted in the time budget)")
        p = budget.plan(parts, started + parts.data_seconds, log)
        state.wall_seconds = p.spent
        build_optimization(parts)
        replan = [budget.Replan(p, len(parts.batches), log)]
    parts.train_model = dist.wrap_ddp(maybe_compile(parts.model, cfg.train.compile), parts.rt.device)
    open_run(parts, r, state, resume=resume, overwrite=overwrite, trackers=trackers)
    rt, data = parts.rt, parts.data
    log(f"run {run_dir} | {cfg.model.name} {count_parameters(parts.model) / 1e6:.2f}M params | {rt.device} "
        f"{rt.precision}{' channels-last' if rt.channels_last else ''} | {len(data.train_x)} train / "
        f"{len(data.val_x)} val{f' | {dist.world_size()} processes' if dist.world_size() > 1 else ''}")
    with SignalGuard() as guard:
        run_epochs(parts, state, replan + default_callbacks(guard, log, trackers, on_epoch_end))
    summary = summarize(parts, state, log)
    if guard.signum is not None:  # it came after the last step: the run is finished and written, now stop
        log(f"{signal.Signals(guard.signum).name} after the last step: the run is finished; stopping")
        guard.redeliver()
    return summary


def _agreed_run_dir(out_dir: str | Path, name: str | None, cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    """Rank 0 checks the run directory and picks its (timestamped) name for all ranks."""
    run_dir, error, exc = None, None, None
    if dist.is_main():
        try:
            run_dir = prepare_run_dir(out_dir, name, cfg, resume, overwrite)
        except CifarlabError as e:
            error, exc = str(e), e
    run_dir, error = dist.broadcast_object((run_dir, error))
    if error is not None:
        raise exc or CifarlabError(error)
    return run_dir
