"""Why the model predicts what it does: Grad-CAM heatmaps (Selvaraju et al., 2017, "Grad-CAM: Visual
Explanations from Deep Networks via Gradient-based Localization").

For an activation ``A`` (B, C, h, w) and the logit ``y`` of the explained class, Grad-CAM weighs each channel by
its mean gradient, ``a_c = mean_hw dy/dA_c``, and keeps the positive part of the weighted sum,
``ReLU(sum_c a_c A_c)``: the places whose features raised that class's score. The map is upsampled bilinearly
to the input's size and divided by its maximum (1 = where the evidence for the class is strongest; an image
with no positive evidence gets a map of zeros).

Which activation is explained is declared in the model's spec (:attr:`cifarlab.models.ModelSpec.explain`):

* ``"conv"`` (every conv net: cnn, resnet18, speednet, timm's): the last activation of shape (B, C, h, w) with
  more than one position, found by one probe forward pass with a hook on every module, so no layer is named
  per architecture. It is the feature map the global pooling or flatten reads; ResNet18 with the ImageNet stem
  on 32 px images has a 1x1 last stage (a constant map), so its 2x2 third stage is explained.
* ``"tokens"`` (the ViTs, cifarlab's and timm's): the patch tokens (B, prefix + N, D) entering the last
  block, as its first LayerNorm gives them (``blocks[-1].norm1``, the layer pytorch-grad-cam recommends for
  ViTs: the last block's own output reaches the head only through the class token, so its patch tokens have
  no gradient). The prefix tokens (class, distillation, registers) are dropped and the N patch tokens reshaped
  to their sqrt(N) x sqrt(N) grid, the embedding dimension playing the channels' part.
* ``""``: nothing to explain; :class:`ExplainError`.

Captum (``pip install 'cifarlab[explain]'``, BSD, the PyTorch project's attribution library) computes the
"conv" maps when installed (``LayerGradCam`` and ``LayerAttribution.interpolate``); without it the same maps
come from the few lines of hooks below (tests/test_explain.py checks the two agree). Captum's Grad-CAM averages
the gradient over every dimension after the second, so it does not fit (B, N, D) tokens; those always use the
hooks.

The model is explained as it is: in eval mode (its mode is restored after), in fp32 without autocast, and
gradients are taken with ``torch.autograd.grad`` with respect to the explained activation only, so no
parameter's ``.grad`` is written.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CifarlabError, ConfigError

BACKENDS = ("auto", "captum", "torch")
CAPTUM_HINT = "pip install 'cifarlab[explain]'"


class ExplainError(CifarlabError):
    """The model has no layer to explain, or Captum was asked for and is missing."""


# ----------------------------------------------------------------------------- which layer
def _base(model: nn.Module) -> nn.Module:
    """The bare model under a DDP / compile / EMA wrapper."""
    while isinstance(getattr(model, "module", getattr(model, "_orig_mod", None)), nn.Module):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def explain_kind(model: nn.Module) -> str:
    """The spec's ``explain`` ("conv", "tokens" or ""); a plain module not built by ``create_model``: "conv"."""
    from ..models import spec_of

    try:
        return spec_of(model).explain
    except ConfigError:
        return "conv"


def explain_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, str]:
    """(kind, module name) of what :func:`gradcam` explains in ``model`` for inputs like ``x`` (B, 3, H, W)."""
    base = _base(model)
    kind = explain_kind(base)
    name = None
    if kind == "tokens":
        blocks = getattr(base, "blocks", None)
        if isinstance(blocks, nn.Sequential) and len(blocks) and hasattr(blocks[-1], "norm1"):
            name = f"blocks.{len(blocks) - 1}.norm1"
    elif kind == "conv":
        name = _last_feature_map(base, x[:1])
    if name is None:
        try:
            from ..models import spec_of

            label = spec_of(base).name
        except ConfigError:
            label = type(base).__name__
        raise ExplainError(f"model {label!r} has no layer to explain: Grad-CAM needs a convolutional feature map "
                           f"or a ViT's patch tokens")
    return kind, name


@torch.no_grad()
def _last_feature_map(model: nn.Module, x: torch.Tensor) -> str | None:
    """The name of the last module (in the order their forwards finish) whose output is (B, C, h, w) with h*w > 1.

    A container finishes after its children with the same tensor, so the outermost name of that tensor wins."""
    seen: list[str] = []

    def hook(name: str):
        def f(module, args, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
                seen.append(name)
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    was = model.training
    model.eval()
    try:
        with torch.autocast(x.device.type, enabled=False):
            model(x.float())
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return seen[-1] if seen else None


# ----------------------------------------------------------------------------- Grad-CAM
def gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor | Sequence[int] | None = None, *,
            backend: str = "auto", batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps of normalized inputs ``x`` (B, 3, H, W): ((B, H, W) in [0, 1] on the CPU, (B,) the explained
    classes). ``target``: the class to explain per image; None: the model's prediction.

    ``backend``: "captum" (an :class:`ExplainError` naming the extra when Captum is missing), "torch" (the
    hooks), "auto" (Captum if installed, for "conv" layers)."""
    if backend not in BACKENDS:
        raise CifarlabError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if x.dim() != 4:
        raise CifarlabError(f"gradcam takes (B, C, H, W) images, got shape {tuple(x.shape)}")
    kind, name = explain_layer(model, x)
    use_captum = kind == "conv" and backend != "torch" and (backend == "captum" or _have_captum())
    if backend == "captum" and kind != "conv":
        raise ExplainError("Captum's Grad-CAM explains (B, C, h, w) feature maps, not a ViT's tokens: "
                           "use backend='torch'")
    if use_captum:
        _require_captum()
    if target is not None:
        target = torch.as_tensor(target, dtype=torch.long).reshape(-1)
        if len(target) != len(x):
            raise CifarlabError(f"{len(target)} targets for {len(x)} images")
    base = _base(model)
    layer = base.get_submodule(name)
    maps, classes = [], []
    was = base.training
    base.eval()
    try:
        # Callers may be under inference_mode or no_grad (evaluation code is); the map needs a graph.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            for i in range(0, len(x), batch_size):
                xb = x[i:i + batch_size].detach().clone().float().requires_grad_(True)
                tb = None if target is None else target[i:i + batch_size].to(xb.device)
                fn = _captum_cam if use_captum else _hooks_cam
                cam, tb = fn(base, layer, xb, tb, kind)  # (b, 1, h, w) >= 0
                maps.append(_finish(cam, xb.shape[-2:], use_captum))
                classes.append(tb.cpu())
    finally:
        base.train(was)
    return torch.cat(maps), torch.cat(classes)


def _hooks_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None,
               kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    saved: list[torch.Tensor] = []

    def hook(module, args, out):
        saved.append(out)
        # What follows may modify its input in place (ReLU(inplace=True)); the map needs A as the layer gave it.
        return out.clone()

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(x)  # (B, classes)
    finally:
        handle.remove()
    if target is None:
        target = logits.detach().argmax(1)
    a = saved[-1]
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), a)  # no parameter's .grad is touched
    a, g = a.detach().float(), g.float()
    if kind == "tokens":
        a, g = _token_grid(model, a), _token_grid(model, g)  # (B, D, n, n)
    weights = g.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1): each channel's mean gradient
    return F.relu((weights * a).sum(1, keepdim=True)), target  # (B, 1, h, w)


def _captum_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None,
                kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    from captum.attr import LayerGradCam

    if target is None:
        with torch.no_grad():
            target = model(x).argmax(1)
    cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)  # (B, 1, h, w)
    return cam.detach().float(), target


def _finish(cam: torch.Tensor, size, captum: bool) -> torch.Tensor:
    """(B, 1, h, w) -> (B, H, W) upsampled bilinearly to the input's size, each map divided by its maximum."""
    if captum:
        from captum.attr import LayerAttribution

        up = LayerAttribution.interpolate(cam, tuple(size), "bilinear")
    else:
        up = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
    up = up[:, 0].clamp_min(0)  # bilinear weights are convex: no negatives, only float dust
    peak = up.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, up / peak.clamp_min(torch.finfo(up.dtype).tiny), torch.zeros_like(up)).cpu()


def _token_grid(model: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """(B, prefix + N, D) tokens -> (B, D, n, n) with N = n * n patch tokens."""
    total = t.shape[1]
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:  # cifarlab's ViT: a class token
        prefix = 1 if getattr(model, "cls_token", None) is not None else 0
    n = math.isqrt(total - prefix)
    if n * n != total - prefix:
        raise ExplainError(f"{type(model).__name__}: {total - prefix} patch tokens do not form a square grid")
    return t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], n, n)


def _have_captum() -> bool:
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        return False
    return True


def _require_captum() -> None:
    if not _have_captum():
        raise ExplainError(f"Captum is not installed: {CAPTUM_HINT}")


# ----------------------------------------------------------------------------- trained runs, overlays
def heatmaps(model: nn.Module, images: torch.Tensor, normalize, targets: Sequence[int] | None = None, *,
             device: torch.device | str | None = None, backend: str = "auto",
             batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of uint8 images (N, 3, H, W) through ``normalize`` (a :class:`cifarlab.data.loader.Normalize`):
    ((N, H, W) float32 maps in [0, 1], (N,) the explained classes; the prediction where ``targets`` is None)."""
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    maps, classes = [], []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size].to(device))
        t = None if targets is None else list(targets[i:i + batch_size])
        m, c = gradcam(model, x, t, backend=backend, batch_size=batch_size)
        maps.append(m.numpy())
        classes.append(c.numpy())
    if not maps:
        return np.zeros((0, *images.shape[-2:]), np.float32), np.zeros(0, np.int64)
    return np.concatenate(maps).astype(np.float32), np.concatenate(classes)


def overlay(image: np.ndarray, heat: np.ndarray, *, size: int | None = None, alpha: float = 0.5,
            cmap: str = "turbo") -> np.ndarray:
    """An (H, W, 3) uint8 image with its heatmap (h, w) in [0, 1] blended over it in ``cmap``'s colours:
    (size, size, 3) uint8, the image enlarged with nearest-neighbour pixels, the map bilinearly (default size:
    the image's)."""
    from matplotlib import colormaps
    from PIL import Image

    image = np.asarray(image, np.uint8)
    h, w = image.shape[:2] if size is None else (size, size)
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.NEAREST), np.float32)
    heat = np.asarray(Image.fromarray(np.asarray(heat, np.float32)).resize((w, h), Image.Resampling.BILINEAR))
    colour = colormaps[cmap](np.clip(heat, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * img + alpha * colour, 0, 255).round().astype(np.uint8)


def side_by_side(image: np.ndarray, heat: np.ndarray, *, size: int = 128, gap: int = 4) -> np.ndarray:
    """The image (enlarged with nearest-neighbour pixels) and its :func:`overlay`, ``gap`` white pixels apart:
    (size, 2 * size + gap, 3) uint8."""
    from PIL import Image

    left = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.Resampling.NEAREST))
    white = np.full((size, gap, 3), 255, np.uint8)
    return np.concatenate([left, white, overlay(image, heat, size=size)], axis=1)
