"""Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019) on whole batches, with soft targets."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..data.loader import step_seed


def mixup(x: torch.Tensor, y1h: torch.Tensor, lam: float, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lam * x + (1 - lam) * x[perm], lam * y1h + (1 - lam) * y1h[perm]


def cutmix(x: torch.Tensor, y1h: torch.Tensor, lam: float, perm: torch.Tensor, cy: int, cx: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a box of area ~(1 - lam) from the permuted batch; targets weighted by the exact pasted area."""
    H, W = x.shape[-2:]
    rh, rw = int(H * (1 - lam) ** 0.5), int(W * (1 - lam) ** 0.5)
    y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, H)
    x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, W)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    area = (y1 - y0) * (x1 - x0) / (H * W)
    return out, (1 - area) * y1h + area * y1h[perm]


def build_mix(cfg: DataConfig, num_classes: int, seed: int) -> Callable | None:
    """A function (x, y, epoch, step) -> (x, soft targets), or None when mixup and cutmix are off.

    With both on, each batch uses one of them with probability 1/2 (as timm's Mixup does)."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None

    def apply(x: torch.Tensor, y: torch.Tensor, epoch: int, step: int):
        s = step_seed(seed + 2, epoch, step)
        rng = np.random.default_rng(s)
        use_cutmix = cfg.cutmix > 0 and (cfg.mixup <= 0 or rng.random() < 0.5)
        alpha = cfg.cutmix if use_cutmix else cfg.mixup
        lam = float(rng.beta(alpha, alpha))
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(s)).to(x.device)
        y1h = F.one_hot(y, num_classes).float()
        if use_cutmix:
            H, W = x.shape[-2:]
            return cutmix(x, y1h, lam, perm, int(rng.integers(H)), int(rng.integers(W)))
        return mixup(x, y1h, lam, perm)

    return apply
