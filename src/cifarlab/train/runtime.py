"""Device, precision, memory format and compilation, decided once per run."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TrainConfig
from ..models import model_spec
from ..errors import ConfigError


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    # Loss scaling for fp16, whose gradients underflow without it; a no-op for bf16 and fp32. One per run,
    # so fp16's loss scale carries over between epochs.
    scaler: torch.amp.GradScaler = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def mps_available() -> bool:
    """Apple silicon's GPU (Metal Performance Shaders), as PyTorch sees it."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA if present, else Apple's MPS, else the CPU; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    if name == "mps" and not mps_available():
        raise ConfigError("train.device='mps' but this machine has no MPS device (Apple silicon with a PyTorch "
                          "built for it); use auto or cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "mps":  # MPS autocast is young in PyTorch: fp32 unless asked otherwise
            return "fp32"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.precision=fp16 needs a CUDA device; use bf16 or fp32 on {device.type}")
    return precision


_IMPORTED = time.perf_counter()


def process_age() -> float:
    """Seconds since this process started (from /proc on Linux; elsewhere since cifarlab was imported)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


def keep_freed_memory(enable: bool = True) -> bool:
    """Let glibc's malloc keep and reuse up to 1 GiB of freed memory instead of returning it to the OS.

    By default every allocation above 32 MiB is a fresh mmap, so each step's large activations
    fault in (and zero) new pages: measured here, allocating and filling a 134 MB tensor took 59 ms
    of CPU against 6 ms with this setting, and training steps of the study's ViT ran 35% faster
    (CNN and ResNet18: 5%). jemalloc or tcmalloc through LD_PRELOAD, the usual advice for PyTorch
    on CPUs, do the same. Retention is capped (trim threshold 1 GiB): with no cap the ViT's resident
    memory crept up by 0.5 GB in 16 steps. ``enable=False`` restores glibc's usual steady state
    (thresholds of 32 and 64 MiB) and returns free memory to the OS.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        mmap_at, trim_at = (1 << 30, 1 << 30) if enable else (32 << 20, 64 << 20)
        ok = bool(libc.mallopt(m_mmap_threshold, mmap_at) and libc.mallopt(m_trim_threshold, trim_at))
        if not enable:
            libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):  # not glibc (musl, ...): keep the default allocator
        return False


def setup_runtime(cfg: TrainConfig, model_name: str) -> Runtime:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = resolve_precision(cfg.precision, device)
    # channels-last helps convolutions (oneDNN / cuDNN NHWC kernels); an attention model gains nothing: its spec says.
    channels_last = cfg.channels_last and model_spec(model_name).channels_last
    return Runtime(device, precision, channels_last)


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    if not enabled or os.environ.get("CIFARLAB_NO_COMPILE"):
        return model
    return torch.compile(model)
