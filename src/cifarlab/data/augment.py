"""Batched augmentation on the training device: no per-image Python, no PIL.

The study's pipeline, ``RandomApply([RandomHorizontalFlip(), RandomRotation(d),
RandomResizedCrop(32, scale, ratio)], p)``, becomes one affine warp per image:
flip, rotation and crop compose into a 2x3 matrix, and ``grid_sample`` warps the
whole batch at once. Images not drawn (probability 1 - p) get the identity
matrix, so the batch never leaves the device and no host sync is needed.

The fast-training augmentations follow airbench (Jordan, 2024): random crop of a
reflect-padded image (translate), alternating flips, and cutout (DeVries &
Taylor, 2017).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import DataConfig
from .trivial_augment import trivial_augment_wide


def study_affine(n: int, cfg: DataConfig, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 2, 3) affine matrices, in normalized coordinates, mapping output to input pixels."""

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo

    apply = torch.rand(n, generator=gen, device=device) < cfg.augment_p
    # RandomResizedCrop: area fraction s and aspect ratio r (log-uniform), as torchvision draws them.
    s = u(*cfg.crop_scale)
    r = torch.exp(u(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
    w = torch.sqrt(s * r).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(s / r).clamp(max=1.0)
    cx = u(-1.0, 1.0) * (1 - w)  # crop centre, normalized coords in [-1, 1]
    cy = u(-1.0, 1.0) * (1 - h)
    angle = u(-cfg.rotation, cfg.rotation) * (math.pi / 180.0)
    flip = torch.where((torch.rand(n, generator=gen, device=device) < 0.5) & torch.tensor(cfg.augment_flip, device=device),
                       -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta = Flip @ Rot @ Crop: crop picks a window of the rotated image, rotation samples the flipped one.
    theta = torch.stack([
        torch.stack([flip * cos * w, -flip * sin * h, flip * (cos * cx - sin * cy)], -1),
        torch.stack([sin * w, cos * h, sin * cx + cos * cy], -1),
    ], 1)
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], device=device).expand(n, 2, 3)
    return torch.where(apply[:, None, None], theta, eye)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def translate(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random crop of the reflect-padded batch back to its size: shifts of up to ``pad`` pixels."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=gen, device=x.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None].expand(B, C, H, W + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :].expand(B, C, H, W)
    return xp.gather(3, cols)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero one ``size`` x ``size`` square per image at a random centre (may overlap the border)."""
    B, _, H, W = x.shape
    cy = torch.randint(0, H, (B,), generator=gen, device=x.device)
    cx = torch.randint(0, W, (B,), generator=gen, device=x.device)
    ys = torch.arange(H, device=x.device)[None, :]
    xs = torch.arange(W, device=x.device)[None, :]
    y0, x0 = cy - size // 2, cx - size // 2
    my = (ys >= y0[:, None]) & (ys < (y0 + size)[:, None])  # (B, H)
    mx = (xs >= x0[:, None]) & (xs < (x0 + size)[:, None])  # (B, W)
    mask = my[:, None, :, None] & mx[:, None, None, :]
    return x.masked_fill(mask, 0.0)


def progressive_size(cfg: DataConfig, epoch: int, epochs: int) -> int:
    """Side in pixels of the training images in ``epoch`` (0-based) of ``epochs`` under progressive resizing.

    Linear from ``cfg.progressive_size`` at epoch 0 to ``cfg.image_size`` at ``progressive_until * epochs``,
    rounded down to a multiple of 4 pixels (never below the start); full size from there on.
    """
    start, full = cfg.progressive_size, cfg.image_size
    if not start or full is None or start >= full or epoch >= (ramp := cfg.progressive_until * epochs):
        return full
    size = start + (full - start) * epoch / ramp
    return max(start, min(full, int(size) // 4 * 4))


def progressive_cost(cfg: DataConfig, epochs: int) -> float:
    """The run's pixels per training image relative to full size (1.0 when progressive resizing is off):
    a conv net's compute, and roughly its time, scale with it."""
    if not cfg.progressive_size:
        return 1.0
    return sum((progressive_size(cfg, e, epochs) / cfg.image_size) ** 2 for e in range(epochs)) / epochs


class BatchAugment:
    """Applies the configured augmentations to a float batch in [0, 1] (before normalization).

    ``epochs`` (the run's length) is needed only for progressive resizing (``size``).
    """

    def __init__(self, cfg: DataConfig, n_images: int, seed: int, epochs: int | None = None):
        self.cfg = cfg
        self.epochs = epochs
        if cfg.progressive_size and epochs is None:
            raise ValueError("progressive resizing needs the run's number of epochs")
        # Alternating flip: a fixed random half of the images is flipped on even epochs, the other half on odd.
        g = torch.Generator().manual_seed(seed + 7919)
        self.flip_base = torch.rand(n_images, generator=g) < 0.5

    @property
    def active(self) -> bool:
        c = self.cfg
        return c.augment_p > 0 or c.flip != "none" or c.translate > 0 or c.trivial_augment

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, epoch: int, gen: torch.Generator) -> torch.Tensor:
        c = self.cfg
        if c.augment_p > 0:
            x = warp(x, study_affine(x.shape[0], c, gen, x.device))
        if c.flip == "random":
            m = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
            x = torch.where(m[:, None, None, None], x.flip(3), x)
        elif c.flip == "alternating":
            m = self.flip_base.to(x.device)[idx] ^ bool(epoch % 2)
            x = torch.where(m[:, None, None, None], x.flip(3), x)
        if c.translate > 0:
            x = translate(x, c.translate, gen)
        if c.trivial_augment:  # after crop and flip, as in torchvision's CIFAR recipes
            x = trivial_augment_wide(x, gen)
        return x

    def size(self, epoch: int) -> int:
        """Training image side for ``epoch`` (``image_size`` unless progressive resizing is on)."""
        return progressive_size(self.cfg, epoch, self.epochs)

    def post_normalize(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Cutout fills with 0 after normalization, i.e. with the data set's mean colour."""
        if self.cfg.cutout > 0:
            x = cutout(x, self.cfg.cutout, gen)
        return x
