"""Dropout (Srivastava et al., 2014) with a faster random mask on the CPU.

On the CPU, PyTorch draws a dropout mask one element at a time from a single Mersenne Twister
(``bernoulli_`` is serial on non-Intel CPUs), about 9 ns per element here: for the study's
ViT, whose MLP activations alone are 128 x 257 x 1024 per layer, dropout took more time than
all of its matrix products. This version draws 64 random bits per word (``random_`` over the
full int64 range), splits each word into four 16-bit uniforms and keeps an element when its
uniform falls below ``(1 - p) * 2**16``: 3.2x faster for the same tensor. The kept elements
are scaled by ``1 / (1 - p)`` exactly as in ``F.dropout``; the keep probability is ``1 - p``
rounded to a multiple of 2**-16 (exact for p = 0.25 or 0.5, off by under 8e-6 otherwise).
Masks come from torch's default generator, so ``torch.manual_seed`` replays them.
On other devices, and for p outside [2**-16, 1 - 2**-16], it is ``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_LEVELS = 1 << 16


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 1 / _LEVELS <= p <= 1 - 1 / _LEVELS:
        return F.dropout(x, p, training=True)
    n = x.numel()
    # int64 words with all 64 bits random (from=-2**63, to=None), read as four int16 uniforms each.
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None).view(torch.int16)[:n]
    keep = bits.view(x.shape) < round((1.0 - p) * _LEVELS) - _LEVELS // 2
    # bool -> uint8 is a free view; uint8 -> bf16 converts 2x faster than bool -> bf16 here
    return x * keep.view(torch.uint8).to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same state, repr and isinstance) whose CPU mask is drawn by :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
