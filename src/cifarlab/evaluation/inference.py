"""Inference on uint8 images: logits in large batches, test-time augmentation, loss and accuracy.

Shared by training (validation), ``evaluate``, ``predict``, ``export`` and ``serve``: every number a run
reports comes from :func:`predict_logits`, with one normalization (:class:`Normalize`, the same arithmetic
as the training batches') and one TTA (:func:`tta_logits`); every trained model is loaded by
:func:`cifarlab.evaluation.loader.load_model`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.loader import Normalize  # noqa: F401  (the inference API's normalization)

if TYPE_CHECKING:  # a type only: the training loop imports this module, so it imports nothing of train/
    from ..train.runtime import Runtime


@torch.inference_mode()
def predict_logits(model: nn.Module, x_uint8: torch.Tensor, normalize: Callable | Any, rt: Runtime,
                   batch_size: int, tta: str = "none") -> torch.Tensor:
    """Logits (N, C) in fp32 for uint8 images (N, C, H, W), in large batches under ``inference_mode``.

    ``normalize`` maps a uint8 batch on the device to the model's input: a :class:`Normalize`, or anything
    with a ``normalize`` method (the training batches, whose normalization the model was trained with)."""
    normalize = getattr(normalize, "normalize", normalize)
    model.eval()
    out = []
    for i in range(0, len(x_uint8), batch_size):
        xb = normalize(x_uint8[i:i + batch_size].to(rt.device, non_blocking=True))
        if rt.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            out.append(tta_logits(model, xb, tta).float())
    return torch.cat(out) if out else torch.zeros(0)


TTA_VIEWS = {"none": 1, "flip": 2, "flip_translate": 6}  # forward passes per image of each train.tta


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Test-time augmentation: average the logits over flips (and one-pixel translations).

    ``flip``: the mean over the image and its mirror. ``flip_translate`` (airbench's weighting): half that
    mean, half the mean over the four mirrored and unmirrored copies shifted by -1 and +1 pixel in both axes.
    """
    logits = model(x)
    if tta == "none":
        return logits
    logits = (logits + model(x.flip(3))) / 2
    if tta == "flip_translate":
        pad = F.pad(x, (1, 1, 1, 1), mode="reflect")
        H, W = x.shape[-2:]
        shifted_sum = 0
        for dy, dx in ((0, 0), (2, 2)):  # shift by -1 and +1 pixel in both axes
            shifted = pad[..., dy:dy + H, dx:dx + W]
            shifted_sum = shifted_sum + model(shifted) + model(shifted.flip(3))
        logits = logits / 2 + shifted_sum / 8
    return logits


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Callable | Any, rt: Runtime,
             batch_size: int, tta: str = "none") -> tuple[float, float, torch.Tensor]:
    """(loss, accuracy, logits) on a labelled set."""
    logits = predict_logits(model, x, normalize, rt, batch_size, tta)
    y = y.to(logits.device)
    loss = F.cross_entropy(logits, y).item() if len(y) else float("nan")
    acc = (logits.argmax(1) == y).float().mean().item() if len(y) else float("nan")
    return loss, acc, logits
