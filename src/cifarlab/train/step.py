"""The one training step, shared by the training loop and the lr finder, and its loss.

:func:`train_step` is forward, loss, backward, gradient clipping, decoupled weight decay, the optimizer
step through the loss scaler (fp16), then Lookahead and the EMA when the run has them. The loop
(:func:`cifarlab.train.loop.train_one_epoch`) and the lr range test
(:func:`cifarlab.train.lr_finder.lr_find`) both call it, so the test measures the step that training takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as dist
from .optim import apply_decoupled_wd
from .state import Parts


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against hard labels (N,) or soft targets (N, C) from mixup / cutmix.

    ``weight`` (C,) weights each class's terms; the mean is over the weights, as ``F.cross_entropy``'s.
    """
    if target.ndim == 1:
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)
    if label_smoothing:
        target = target * (1 - label_smoothing) + label_smoothing / logits.shape[1]
    if weight is None:
        return torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
    wt = target * weight
    return torch.sum(-wt * F.log_softmax(logits, dim=1)) / wt.sum()


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``n / (C * n_c)`` per class (scikit-learn's ``class_weight="balanced"``): each class weighs the same
    in the loss whatever its number of images; a class with no training image gets weight 0."""
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.float()


@dataclass
class StepResult:
    loss: torch.Tensor  # the batch's mean loss (fp32, on the device, detached)
    logits: torch.Tensor  # (N, C), detached
    applied: bool  # False: skipped (--nan-policy skip-batch and a non-finite loss on some rank)
    finite: torch.Tensor  # bool scalar on the device: no host sync unless the policy needs one


def train_step(parts: Parts, x: torch.Tensor, target: torch.Tensor, global_step: int,
               nan_policy: str | None = None) -> StepResult:
    """One optimization step of ``parts.train_model`` on a batch; ``target`` is (N,) labels or (N, C) soft
    targets. ``global_step`` counts the steps before this one (Lookahead's and the EMA's schedules)."""
    t = parts.cfg.train
    nan_policy = t.nan_policy if nan_policy is None else nan_policy
    optimizer, scaler = parts.optimizer, parts.rt.scaler
    with parts.rt.autocast():
        logits = parts.train_model(x)
        loss = soft_cross_entropy(logits.float(), target, t.label_smoothing, parts.class_weight)
    finite = torch.isfinite(loss)
    if nan_policy == "skip-batch" and dist.any_rank(~finite):  # a host sync only under this policy
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss.detach(), logits.detach(), False, finite)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if t.grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(parts.train_model.parameters(), t.grad_clip)
    apply_decoupled_wd(optimizer)
    scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
    scaler.update()
    if parts.lookahead is not None:
        parts.lookahead.step(parts.train_model, global_step + 1)
    if parts.ema is not None and (global_step + 1) % t.ema_every == 0:
        parts.ema.update(parts.train_model)
    return StepResult(loss.detach(), logits.detach(), True, finite)
