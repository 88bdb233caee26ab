"""A thin runtime adapter: airbench94 (Keller Jordan's ``airbench`` 0.1.8 from PyPI) on cifarlab's images,
on a GPU as published and on a CPU.

airbench's code is used unmodified: ``train94`` with its own hyperparameters (``hyp``), ``make_net94``,
``CifarLoader`` and ``evaluate``. What this module adds around them, and only that:

- the data: cifarlab's decoded images written as the ``train.pt`` / ``test.pt`` files ``CifarLoader`` reads
  (uint8 NHWC images, labels, class names), so that airbench trains and is scored on the very images
  cifarlab sees, not on a download of the original set;
- the clock and the scores: ``train94`` takes a ``train_loader``; :class:`TimedLoader` (a ``CifarLoader``)
  times each pass over it, from ``__iter__`` (where airbench prepares its images on the first epoch) to the
  step on its last batch, and between passes scores the model with airbench's ``evaluate`` at its TTA level,
  off the clock. ``make_net`` (a ``train94`` argument too) hands the adapter the model it scores;
- on a CPU only (:func:`cuda_pointed_at_cpu`): ``nn.Module.cuda`` returns the module where it is,
  ``torch.cuda.Event`` / ``torch.cuda.synchronize`` are a wall clock and a no-op, the ``CifarLoader`` that
  ``train`` builds for its (unused, ``verbose=False``) test set loads to the CPU; ``make_net94``'s fp16
  weights become fp32 (fp16 compute on a CPU is emulated and slow; the initial values keep their fp16
  rounding, as on a GPU), and :class:`AutocastNet94` enters bf16 autocast for each forward where the CPU
  has native bf16 (cifarlab's own test, :func:`cifarlab.train.runtime.cpu_supports_bf16`), with the 2x2
  whitening convolution kept in fp32: its filters are scaled by 1/sqrt(eigenvalue) and bf16's 8 bits of
  mantissa would blur the small-eigenvalue directions it exists to amplify.

The images themselves stay in airbench's fp16 on both devices (its ``CifarLoader`` makes them so).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import torch.nn as nn


def require_airbench():
    """The ``airbench`` package, or an ImportError saying how to install it (a benchmark-only dependency)."""
    try:
        return importlib.import_module("airbench")
    except ImportError as e:
        raise ImportError("airbench is not installed: pip install 'airbench==0.1.8' "
                          "(or pip install -e '.[bench]')") from e


def write_loader_files(out_dir: Path, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                       test_y: torch.Tensor, classes: list[str]) -> Path:
    """``out_dir/train.pt`` and ``test.pt`` as ``CifarLoader`` reads them: uint8 (N, H, W, C) images."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        torch.save({"images": x.permute(0, 2, 3, 1).contiguous(), "labels": y.long().clone(),
                    "classes": list(classes)}, out_dir / f"{name}.pt")
    return out_dir


# ============================================================================ CPU runtime
class _WallClockEvent:
    """``torch.cuda.Event(enable_timing=True)`` on a CPU: ``record`` reads the wall clock."""

    def __init__(self, enable_timing: bool = False, **_):
        self.t = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "_WallClockEvent") -> float:
        return 1e3 * (end.t - self.t)  # milliseconds, as CUDA events

    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def cuda_pointed_at_cpu(airbench_utils, data_dir: Path):
    """While airbench's ``train`` runs on a CPU: its CUDA calls go to the CPU, and the test-set loader it
    builds from ``'cifar10'`` reads ``data_dir`` instead (onto the CPU)."""
    base = airbench_utils.CifarLoader

    def cpu_loader(path, *args, gpu=0, **kwargs):
        return base(str(data_dir) if path == "cifar10" else path, *args, gpu="cpu", **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.cuda, "Event", _WallClockEvent))
        stack.enter_context(mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(airbench_utils, "CifarLoader", cpu_loader))
        yield


@contextlib.contextmanager
def test_loader_from(airbench_utils, data_dir: Path):
    """On a GPU: the test-set loader ``train`` builds from ``'cifar10'`` reads ``data_dir`` (no download)."""
    base = airbench_utils.CifarLoader

    def loader(path, *args, **kwargs):
        return base(str(data_dir) if path == "cifar10" else path, *args, **kwargs)

    with mock.patch.object(airbench_utils, "CifarLoader", loader):
        yield


class AutocastNet94(nn.Sequential):
    """airbench94's ``nn.Sequential``, same modules and parameter names, with a forward for the CPU: the
    whitening convolution (module 0) in fp32, the rest under bf16 autocast when ``bf16``; fp32 logits."""

    bf16: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            x = self[0](x.float())  # (B, 12, 31, 31) whitened patches, fp32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            for module in list(self)[1:]:
                x = module(x)
        return x.float()  # (B, 10)


def make_net_for(airbench, device: torch.device, bf16: bool, widths: list[int] | None = None
                 ) -> Callable[[], nn.Module]:
    """A ``make_net`` for ``train94``: ``make_net94`` as published on CUDA; on a CPU its net in fp32 on the
    CPU as :class:`AutocastNet94`. ``widths`` (its three block widths; default hyp's 64, 256, 256) for tiny runs."""
    kwargs = {} if widths is None else {"widths": dict(zip(("block1", "block2", "block3"), widths))}

    def make_net() -> nn.Module:
        if device.type == "cuda":
            with torch.cuda.device(device):
                return airbench.make_net94(**kwargs)
        with mock.patch.object(nn.Module, "cuda", lambda self, device=None: self):
            net = airbench.make_net94(**kwargs)
        net = AutocastNet94(*net).float().to(memory_format=torch.channels_last)
        net.bf16 = bf16
        return net

    return make_net


# ============================================================================ the timed run
@dataclass
class AirbenchRun:
    """What one ``train94`` run gave: per pass (epochs done, training seconds so far, test accuracy)."""

    rows: list[tuple[float, float, float]] = field(default_factory=list)
    steps: int = 0  # training steps taken (batches airbench's loop consumed)
    epochs: float = 0.0  # the schedule's length (airbench's ``train_epochs``)
    setup_s: float = 0.0  # from ``make_net`` to the first pass: net, optimizer, whitening init (not counted)
    eval_s: float = 0.0
    weights_moved: float = 0.0  # norm of the classifier's change over the run: 0 would mean no training

    @property
    def acc(self) -> float:
        return self.rows[-1][2]

    @property
    def train_s(self) -> float:
        return self.rows[-1][1]


def timed_loader_class(airbench, device: torch.device):
    """A ``CifarLoader`` subclass that times each pass and scores the model between passes (see the module
    docstring); ``on_pass_end`` does the scoring and is called once per pass, after the clock stopped."""

    class TimedLoader(airbench.CifarLoader):
        def __init__(self, *args, on_pass_end: Callable[[float, int], None], **kwargs):
            super().__init__(*args, gpu="cpu" if device.type == "cpu" else device.index or 0, **kwargs)
            self.on_pass_end = on_pass_end
            self.train_seconds = 0.0
            self.steps = 0
            self.first_pass_at: float | None = None
            self.error: BaseException | None = None
            self.total_steps = math.inf  # set by the caller: the schedule's steps
            self._started: float | None = None

        def _sync(self) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def _end_pass(self) -> None:
            if self._started is None:
                return
            self._sync()
            self.train_seconds += time.perf_counter() - self._started
            self._started = None
            try:
                self.on_pass_end(self.train_seconds, self.steps)
            except BaseException as e:  # kept: raised inside the generator's close(), Python would only print it
                self.error = e
                raise

        def __iter__(self):
            self._sync()
            self._started = time.perf_counter()
            if self.first_pass_at is None:
                self.first_pass_at = self._started
            # The pass ends when the loop has taken its last batch's step: at exhaustion, or when train()
            # breaks out after the last scheduled step and this generator is closed. An error raised in
            # close() would only be printed: it is kept and raised by train_airbench94 after train94 returns.
            try:
                for batch in super().__iter__():
                    self.steps += 1
                    yield batch
            except GeneratorExit:
                if self.steps >= self.total_steps:
                    try:
                        self._end_pass()
                    except BaseException:
                        pass  # in self.error
                else:  # abandoned mid-pass (an error in train's loop): no score
                    self._started = None
                raise
            self._end_pass()

    return TimedLoader


def train_airbench94(data_dir: Path, device: torch.device, *, seed: int = 0, epochs: float | None = None,
                     batch_size: int | None = None, bf16: bool = False, score_from: float = 1,
                     subset: int | None = None, widths: list[int] | None = None,
                     log: Callable[[str], None] = lambda s: None) -> AirbenchRun:
    """One ``train94`` run on ``data_dir``'s ``train.pt``, scored on its ``test.pt`` after every pass.

    ``epochs`` / ``batch_size`` default to airbench94's ``hyp`` (9.9 and 1024); everything else is ``hyp``.
    ``score_from=P`` scores only after pass P and later ones (the last always; ``math.inf``: the last only; a
    pass not scored has accuracy NaN); ``subset`` trains on the first images only;
    ``widths`` are the net's block widths (default hyp's).
    """
    airbench = require_airbench()
    utils = importlib.import_module("airbench.utils")
    lib94 = importlib.import_module("airbench.lib_airbench94")
    hyp = lib94.hyp
    epochs = hyp["opt"]["train_epochs"] if epochs is None else epochs
    batch_size = hyp["opt"]["batch_size"] if batch_size is None else batch_size
    tta_level = hyp["net"]["tta_level"]
    gpu = "cpu" if device.type == "cpu" else (device.index or 0)
    test_loader = airbench.CifarLoader(str(data_dir), train=False, batch_size=2000, gpu=gpu)
    run = AirbenchRun(epochs=epochs)
    holder: dict[str, object] = {}

    def on_pass_end(train_seconds: float, steps: int) -> None:
        t0 = time.perf_counter()
        acc = float("nan")
        passes = len(run.rows) + 1
        if passes >= score_from or steps >= total_steps:
            acc = airbench.evaluate(holder["model"], test_loader, tta_level=tta_level)
        run.eval_s += time.perf_counter() - t0
        done = steps / len(loader)
        run.rows.append((done, train_seconds, acc))
        score = "not scored" if math.isnan(acc) else f"test acc {acc:.4f} (tta level {tta_level})"
        log(f"airbench94 | epoch {done:5.2f}/{epochs} | train {train_seconds:7.1f} s | {score}")

    TimedLoader = timed_loader_class(airbench, device)
    loader = TimedLoader(str(data_dir), train=True, batch_size=batch_size, aug=hyp["aug"], altflip=True,
                         on_pass_end=on_pass_end)
    if subset is not None:
        loader.images, loader.labels = loader.images[:subset], loader.labels[:subset]
    total_steps = loader.total_steps = math.ceil(len(loader) * epochs)  # as airbench's train computes it
    if total_steps == 0:
        raise ValueError(f"batch size {batch_size} leaves no training batch for {len(loader.images)} images")
    base_make_net = make_net_for(airbench, device, bf16, widths)

    def make_net() -> nn.Module:
        holder["made_at"] = time.perf_counter()
        net = base_make_net()
        holder["model"] = net
        holder["head0"] = net[-2].weight.detach().float().clone()  # the classifier, to check it trained
        return net

    runtime = cuda_pointed_at_cpu(utils, data_dir) if device.type == "cpu" else test_loader_from(utils, data_dir)
    torch.manual_seed(seed)  # airbench draws its init, shuffles and augmentations from the global generator
    with runtime:
        model = airbench.train94(loader, epochs=epochs, make_net=make_net, verbose=False)
    loader._end_pass()  # a no-op where the closed generator has already ended the last pass
    if loader.error is not None:
        raise loader.error
    run.steps = loader.steps
    run.setup_s = (loader.first_pass_at or holder["made_at"]) - holder["made_at"]
    run.weights_moved = float((model[-2].weight.detach().float() - holder["head0"]).norm())
    return run
