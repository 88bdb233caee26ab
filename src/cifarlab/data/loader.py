"""Batches from uint8 tensors that live on the training device.

No DataLoader workers: each epoch is a ``randperm`` of the indices, each batch an
index into the uint8 tensor, converted, augmented and normalized as a whole on
the device (the airbench recipe). Every batch draws its randomness from a
generator seeded by (seed, epoch, step), so any step can be replayed exactly,
which is what makes mid-epoch resume bit-exact.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .augment import BatchAugment


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    # ``rank`` gives each DDP process its own augmentation and dropout draws; rank 0 keeps the
    # single-process seeds, so a one-process run is unchanged.
    return (seed * 1_000_003 + epoch * 10_007 + step + rank * 1_000_000_007) % (2**63 - 1)


class Normalize:
    """uint8 (N, C, H, W) on ``device`` -> float ``(x / 255 - mean) / std``, the training batches' arithmetic.

    ``(x/255 - m)/s == x*scale + shift``: one multiply-add per element."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device | str = "cpu"):
        m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * s), -m / s

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        return xb.float() * self.scale + self.shift


class DeviceBatches:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, mean: list[float], std: list[float],
                 device: torch.device, shuffle: bool = False, drop_last: bool = False,
                 augment: BatchAugment | None = None, seed: int = 0, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.augment = augment
        self.seed = seed
        self.channels_last = channels_last
        self.rank, self.world_size = rank, world_size
        self.normalize = Normalize(mean, std, device)
        self.scale, self.shift = self.normalize.scale, self.normalize.shift

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _per_rank(self) -> int:
        return len(self.x) // self.world_size if self.world_size > 1 else len(self.x)

    def order(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch, -1))
            perm = torch.randperm(len(self.x), generator=g)
        else:
            perm = torch.arange(len(self.x))
        if self.world_size > 1:  # each rank its own shard of the same permutation
            # Strided, so that step k's batches of all ranks together are exactly the k-th contiguous
            # chunk of batch_size * world_size indices: the batch one process of that size would take.
            n = self._per_rank() * self.world_size
            perm = perm[:n][self.rank::self.world_size]
        return perm.to(self.device)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (step, images, labels) for one epoch, starting at ``start_step``."""
        perm = self.order(epoch)
        size = self.augment.size(epoch) if self.augment is not None else None
        for step, idx, xb in self._gathered(perm, start_step):
            if self.augment is not None and (self.augment.active or self.augment.cfg.cutout > 0):
                gen = torch.Generator(device=self.device).manual_seed(step_seed(self.seed, epoch, step, self.rank))
                xb = self.augment(xb.float() / 255.0, idx, epoch, gen)
                xb = self.augment.post_normalize(xb * 255.0 * self.scale + self.shift, gen)
            else:
                xb = self.normalize(xb)
            if size is not None and size != xb.shape[-1]:  # progressive resizing: a downscaled epoch
                xb = F.interpolate(xb, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield step, xb, self.y[idx]

    def _gathered(self, perm: torch.Tensor, start_step: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(step, indices, uint8 images) per batch; :class:`~cifarlab.data.streaming.StreamingBatches` reads
        them from the host instead."""
        for step in range(start_step, len(self)):
            idx = perm[step * self.batch_size:(step + 1) * self.batch_size]
            yield step, idx, self.x[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _, xb, yb in self.epoch(0):
            yield xb, yb
