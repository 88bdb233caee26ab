"""Data larger than the device's memory budget: images read from the decode cache's memory map per batch.

:class:`HostImages` stands where a split's (N, 3, H, W) uint8 tensor would: ``len``, ``shape``, indexing by
a slice, an index array or tensor (gathering just those rows from the memory map) and ``numpy()``. The
operating system pages the cache file in and out, so a data set larger than memory trains at the pace of
its batches. :class:`StreamingBatches` gathers each training batch on the host (rows read in file order),
pins it on CUDA and copies it ahead of use while the current step runs; everything after the gather is
:class:`~cifarlab.data.loader.DeviceBatches`' own code, so the same seed gives the same batches and the
same metrics as the in-memory path.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from .loader import DeviceBatches

MiB = 1 << 20


class HostImages:
    """(N, C, H, W) uint8 images: rows ``idx`` of an (M, H, W, C) array, gathered when indexed."""

    dtype = torch.uint8

    def __init__(self, base: np.ndarray, idx: np.ndarray):
        self.base = base
        self.idx = np.asarray(idx, np.int64)

    @property
    def shape(self) -> torch.Size:
        _, h, w, c = self.base.shape
        return torch.Size((len(self.idx), c, h, w))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        rows = self.idx[key]
        if np.ndim(rows) == 0:
            return gather(self.base, rows[None])[0]
        return gather(self.base, rows)

    def numpy(self) -> np.ndarray:
        return self[:].numpy()

    def chunks(self, n: int = 4096) -> Iterator[torch.Tensor]:
        for i in range(0, len(self), n):
            yield self[i:i + n]


def gather(base: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """Rows of an NHWC array as a contiguous NCHW uint8 tensor, read in ascending order (sequential pages)."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *base.shape[1:]), np.uint8)
    out[order] = base[rows[order]]
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def memory_budget(device: torch.device | str | None, setting_mib: float | None) -> int:
    """Bytes of images the device may hold: ``data.device_memory`` MiB, else half of what is free now."""
    if setting_mib is not None:
        return int(setting_mib * MiB)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"] // 2
    except (OSError, KeyError, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class StreamingBatches(DeviceBatches):
    """:class:`DeviceBatches` over :class:`HostImages`: batch k+1 is gathered (and copied) while k trains."""

    def __init__(self, x: HostImages, y: torch.Tensor, batch_size: int, **kw):
        super().__init__(x[:0], y, batch_size, **kw)  # an empty stand-in: the images stay on the host
        self.x = x
        self.pin = self.device.type == "cuda"

    def _load(self, idx: torch.Tensor) -> torch.Tensor:
        xb = self.x[idx]
        if self.pin:
            xb = xb.pin_memory()
        return xb.to(self.device, non_blocking=True)

    def _gathered(self, perm: torch.Tensor, start_step: int):
        perm = perm.cpu()
        steps = range(start_step, len(self))
        if not len(steps):
            return
        with ThreadPoolExecutor(1, thread_name_prefix="cifarlab-prefetch") as ex:
            bs = self.batch_size
            nxt = ex.submit(self._load, perm[steps[0] * bs:(steps[0] + 1) * bs])
            for step in steps:
                xb = nxt.result()
                if step + 1 < len(self):
                    nxt = ex.submit(self._load, perm[(step + 1) * bs:(step + 2) * bs])
                yield step, perm[step * bs:(step + 1) * bs].to(self.device), xb


def make_batches(x, y: torch.Tensor, batch_size: int, **kw) -> DeviceBatches:
    """The one place that picks the batches: streaming for host images, device-resident otherwise."""
    if isinstance(x, HostImages):
        return StreamingBatches(x, y, batch_size, **kw)
    return DeviceBatches(x, y, batch_size, **kw)
