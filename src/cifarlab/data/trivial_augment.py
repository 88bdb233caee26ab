"""TrivialAugment-Wide (Müller & Hutter, 2021, "TrivialAugment: Tuning-free Yet
State-of-the-Art Data Augmentation", ICCV), batched on the training device.

Each image gets one operation drawn uniformly from the 14 below, with a
magnitude bin drawn uniformly from 0..30 (and a random sign where the op has
one). The "wide" ranges are those of the paper and of torchvision's
``TrivialAugmentWide``: shear 0.99, translate 32 px (here: the image width),
rotation 135 degrees, enhance factors 1 +/- 0.99, posterize 8..2 bits,
solarize threshold 1..0.

Batching: images are grouped by their op, and each op runs once on its group
as a few tensor operations (one ``grid_sample`` for a geometric op, a blend for
an enhance op, a batched histogram for equalize); there is no per-image Python.
Inputs and outputs are float images in [0, 1], (N, C, H, W).

Deviations from torchvision, on purpose:

* solarize inverts pixels strictly above the threshold (torchvision: at or
  above), so that magnitude 0 (threshold 1) is the identity like every other op
  with a magnitude;
* geometric ops use nearest sampling with black fill, as torchvision's default,
  and shear about the top-left corner, as torchvision and PIL do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NUM_BINS = 31

# (name, maximum magnitude, signed)
OPS: tuple[tuple[str, float, bool], ...] = (
    ("identity", 0.0, False),
    ("shear_x", 0.99, True),
    ("shear_y", 0.99, True),
    ("translate_x", 1.0, True),  # fraction of the image width: 32 px on CIFAR, as TA-Wide's 32.0
    ("translate_y", 1.0, True),
    ("rotate", 135.0, True),  # degrees
    ("brightness", 0.99, True),
    ("color", 0.99, True),
    ("contrast", 0.99, True),
    ("sharpness", 0.99, True),
    ("posterize", 6.0, False),  # bits removed: 8 - round(m * 6) kept
    ("solarize", 1.0, False),  # threshold 1 - m
    ("autocontrast", 0.0, False),
    ("equalize", 0.0, False),
)
OP_NAMES = tuple(name for name, _, _ in OPS)


def trivial_augment_wide(x: torch.Tensor, gen: torch.Generator | None = None,
                         num_bins: int = NUM_BINS) -> torch.Tensor:
    """Apply one random op with a random magnitude to each image of the batch ``x`` in [0, 1]."""
    n = x.shape[0]
    op = torch.randint(len(OPS), (n,), generator=gen, device=x.device)
    level = torch.randint(num_bins, (n,), generator=gen, device=x.device)
    sign = torch.where(torch.rand(n, generator=gen, device=x.device) < 0.5, -1.0, 1.0)
    return apply_ops(x, op, level.float() / (num_bins - 1), sign)


def apply_ops(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Apply op ``op[i]`` (index into OPS) with magnitude fraction ``magnitude[i]`` in [0, 1] to image i."""
    out = x.clone()
    for k, (name, max_mag, signed) in enumerate(OPS):
        if name == "identity":
            continue
        idx = (op == k).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        v = magnitude[idx].to(x.dtype) * max_mag
        if signed:
            v = v * sign[idx].to(x.dtype)
        out[idx] = _FUNCS[name](x[idx], v)
    return out


# ----------------------------------------------------------------- geometric ops
def _affine_pixels(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Warp by (n, 2, 3) matrices mapping output pixel (col, row, 1) to input pixel; nearest, black fill."""
    n, _, H, W = x.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=x.device, dtype=x.dtype),
                            torch.arange(W, device=x.device, dtype=x.dtype), indexing="ij")
    base = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(1, H * W, 3)  # (1, HW, 3)
    src = base @ a.transpose(1, 2)  # (n, HW, 2) input pixel coordinates
    # pixel -> normalized coordinates of grid_sample with align_corners=False
    gx = (2 * src[..., 0] + 1) / W - 1
    gy = (2 * src[..., 1] + 1) / H - 1
    grid = torch.stack([gx, gy], -1).reshape(n, H, W, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _mat(n: int, x: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, 3, device=x.device, dtype=x.dtype).repeat(n, 1, 1)


def shear_x(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    a = _mat(len(x), x)
    a[:, 0, 1] = v  # in_col = out_col + v * out_row
    return _affine_pixels(x, a)


def shear_y(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    a = _mat(len(x), x)
    a[:, 1, 0] = v
    return _affine_pixels(x, a)


def translate_x(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    a = _mat(len(x), x)
    a[:, 0, 2] = -torch.round(v * x.shape[-1])  # whole pixels: content moves right by v * W
    return _affine_pixels(x, a)


def translate_y(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    a = _mat(len(x), x)
    a[:, 1, 2] = -torch.round(v * x.shape[-2])
    return _affine_pixels(x, a)


def rotate(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate by v degrees about the image centre."""
    H, W = x.shape[-2:]
    t = v * (math.pi / 180.0)
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    a = torch.stack([torch.stack([cos, -sin, cx - cos * cx + sin * cy], -1),
                     torch.stack([sin, cos, cy - sin * cx - cos * cy], -1)], 1)
    return _affine_pixels(x, a)


# ------------------------------------------------------------------ enhance ops
def _blend(x: torch.Tensor, degenerate: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance with factor 1 + v: degenerate + (1 + v) (x - degenerate), clipped to [0, 1].

    Written as x + v (x - degenerate), which is exactly x at v = 0 in floating point."""
    return (x + v.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)  # ITU-R 601 luma, as PIL and torchvision


def brightness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), v)


def color(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).expand_as(x), v)


def contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), v)


def sharpness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH-filtered image (3x3 kernel, centre 5, sum 13); border pixels stay as they are."""
    c = x.shape[1]
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    k = (k / k.sum()).expand(c, 1, 3, 3)
    blurred = x.clone()
    blurred[..., 1:-1, 1:-1] = F.conv2d(x, k, groups=c)
    return _blend(x, blurred, v)


# -------------------------------------------------------------------- pixel ops
def _levels(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round().clamp(0, 255).to(torch.int64)


def posterize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Keep the top 8 - round(v) bits of each 8-bit level."""
    shift = v.round().to(torch.int64).view(-1, 1, 1, 1)
    q = _levels(x)
    return ((q >> shift) << shift).to(x.dtype) / 255.0


def solarize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Invert the pixels above the threshold 1 - v."""
    thr = (1.0 - v).view(-1, 1, 1, 1)
    return torch.where(x > thr, 1.0 - x, x)


def autocontrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to [0, 1]; constant channels are left as they are."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, torch.ones_like(hi), 1.0 / (hi - lo).clamp_min(1e-12))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((x - lo) * scale).clamp(0.0, 1.0)


def equalize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Histogram equalization of each channel's 256 levels, PIL's algorithm (as torchvision's ``equalize``)."""
    n, c, H, W = x.shape
    q = _levels(x).reshape(n * c, H * W)
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.int64)
    hist.scatter_add_(1, q, torch.ones_like(q))
    top = q.amax(1, keepdim=True)  # highest level present: PIL leaves its count out of the step
    step = (H * W - hist.gather(1, top)) // 255  # (n*c, 1)
    safe = step.clamp_min(1)
    lut = (hist.cumsum(1) + safe // 2) // safe
    lut = F.pad(lut, (1, 0))[:, :-1].clamp(0, 255)  # level i maps to lut[i - 1]
    out = lut.gather(1, q)
    out = torch.where(step == 0, q, out)  # a (nearly) constant channel is left as it is
    return out.reshape(n, c, H, W).to(x.dtype) / 255.0


_FUNCS = {
    "shear_x": shear_x, "shear_y": shear_y, "translate_x": translate_x, "translate_y": translate_y,
    "rotate": rotate, "brightness": brightness, "color": color, "contrast": contrast, "sharpness": sharpness,
    "posterize": posterize, "solarize": solarize, "autocontrast": autocontrast, "equalize": equalize,
}
