"""A run's parts (:class:`Parts`) and progress (:class:`TrainState`), the random number generators' state, and
the ways a run stops early (:class:`Interrupted`, :class:`NonFiniteLoss`)."""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import CifarlabError
from . import distributed as dist


class NonFiniteLoss(CifarlabError):
    """The loss became NaN or infinite (``--nan-policy stop``)."""

    exit_code = 3  # not a usage error (2): the input was valid, the optimization diverged


class Interrupted(CifarlabError):
    """SIGINT / SIGTERM: the run stopped after a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "terminated by signal N": 130, 143


def _transient(default=None):
    """A field that lives only while an epoch runs (device tensors) and is never written to a checkpoint."""
    return field(default=default, repr=False, compare=False, metadata={"transient": True})


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
    wall_seconds: float = 0.0  # wall-clock of the run: its epochs with validation, and a time budget's planning
    stop_reason: str = ""  # why the run ended before train.epochs (early stopping), "" when it did not
    epoch_seconds: float = 0.0  # seconds the running epoch had taken when a mid-epoch checkpoint was written
    # time.perf_counter() at the running epoch's start, shifted back by a resumed epoch's seconds.
    epoch_started: float | None = _transient()
    # The running epoch's sums (loss, correct, seen) as device tensors, read only at log points and checkpoints.
    running: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = _transient()
    # First step (1-based) of the running epoch with a non-finite loss, 0 = none; a device tensor (no sync).
    bad: torch.Tensor | None = _transient()


def train_state_dict(state: TrainState, running: tuple | None = None) -> dict:
    """The checkpoint's ``train_state``: the persistent fields, with the running sums when mid-epoch."""
    d = {f.name: copy.deepcopy(getattr(state, f.name)) for f in fields(state) if not f.metadata.get("transient")}
    running = running if running is not None else state.running
    if state.step and running is not None:
        d["partial"] = [float(running[0]), float(running[1]), float(running[2])]
    else:
        d["partial"] = [0.0, 0.0, 0.0]
    # A resumed epoch's seconds count in train_seconds and wall_seconds (the time budget's) like a whole one's.
    mid_epoch = state.step and state.epoch_started is not None
    d["epoch_seconds"] = time.perf_counter() - state.epoch_started if mid_epoch else 0.0
    return d


def check_finite(state: TrainState, epoch: int, nan_policy: str) -> None:
    """Raise NonFiniteLoss if a step of this epoch had a non-finite loss (one host sync)."""
    bad = state.bad
    if nan_policy == "stop" and bad is not None and (bad_step := dist.max_over_ranks(bad)):  # all ranks stop
        raise NonFiniteLoss(f"non-finite loss in epoch {epoch + 1} at step {bad_step} (--nan-policy stop); the run "
                            f"stopped and its last checkpoint, written before that step, is kept")


# --------------------------------------------------------------------------- random number generators
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


@dataclass
class Parts:
    """Everything a run trains with, built once by :func:`cifarlab.train.loop.setup`."""

    cfg: Any  # RunConfig
    spec: Any  # models.ModelSpec: the model's declared capabilities
    rt: Any  # runtime.Runtime: device, precision, layout
    data: Any  # data.ImageData
    model: torch.nn.Module  # the plain model (checkpoints, weights)
    train_model: torch.nn.Module  # what the step runs: the model under torch.compile / DDP when asked
    batches: Any  # DeviceBatches or streamed batches (data.streaming.make_batches)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_step: bool  # the scheduler steps per batch (else per epoch)
    ema: Any = None  # ema.ModelEMA
    lookahead: Any = None  # ema.Lookahead
    finetune: Any = None  # finetune.Finetune: freezing of the first epochs
    mix: Callable | None = None  # mixup / cutmix
    class_weight: torch.Tensor | None = None  # (C,) loss weights on the device
    run_dir: Path | None = None
    data_seconds: float = 0.0  # decoding / loading the data (setup): not counted in a time budget

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validation scores and best.safetensors keeps: the EMA's when the run has one."""
        return self.ema.module if self.ema is not None else self.model
