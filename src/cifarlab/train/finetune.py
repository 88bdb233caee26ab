"""Fine-tuning a pretrained model: head first, discriminative learning rates, frozen BatchNorm statistics.

After fastai's ``Learner.fine_tune`` (Howard & Gugger, 2020) and ULMFiT (Howard & Ruder, 2018):

* ``train.freeze_epochs: N``: the first N epochs train only the head (:func:`cifarlab.models.classifier_name`),
  a freshly initialized layer whose large early gradients would otherwise disturb the pretrained
  backbone; then everything trains. Frozen parameters get no gradient (``requires_grad`` off, so
  their backward is not even computed), and optimizers, weight decay included, leave a parameter
  without a gradient untouched: they stay bit-identical. The epoch alone decides the state, so a
  resumed run freezes as the uninterrupted one did. Not under ``torchrun`` (DDP fixes the set of
  trained parameters when it wraps the model).
* ``optim.backbone_lr_scale: s``: the backbone's learning rate is ``s`` times the head's (fastai's
  ``slice(lr * s, lr)`` with two groups), on top of each group's schedule.
* ``train.freeze_bn: true``: BatchNorm layers stay in eval mode for the whole run: they normalize with,
  and keep, the pretrained running statistics (Keras' fine-tuning guide; useful with small batches).
  Their scale and shift still train when unfrozen.
"""

from __future__ import annotations

import types

import torch.nn as nn

from ..config import TrainConfig
from ..errors import ConfigError
from ..models import classifier_name
from . import distributed as dist
from .checkpoint import unwrap


def head_parameter_ids(model: nn.Module) -> set[int]:
    model = unwrap(model)
    return {id(p) for p in model.get_submodule(classifier_name(model)).parameters()}


class Finetune:
    """Per-epoch freezing of everything but the head."""

    def __init__(self, model: nn.Module, freeze_epochs: int, freeze_bn: bool):
        model = unwrap(model)
        head = head_parameter_ids(model)
        self.backbone = [p for p in model.parameters() if id(p) not in head]
        self.freeze_epochs = freeze_epochs
        if freeze_bn:
            freeze_batchnorm(model)

    def start_epoch(self, epoch: int) -> None:
        trainable = epoch >= self.freeze_epochs
        for p in self.backbone:
            p.requires_grad_(trainable)


def build_finetune(model: nn.Module, t: TrainConfig) -> Finetune | None:
    if not t.freeze_epochs and not t.freeze_bn:
        return None
    if t.freeze_epochs and dist.world_size() > 1:
        raise ConfigError("train.freeze_epochs does not work under torchrun (DDP fixes the trained parameters "
                          "when it wraps the model); train the head in a single-process run first")
    return Finetune(model, t.freeze_epochs, t.freeze_bn)


def _eval_only(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze_batchnorm(model: nn.Module) -> int:
    """Keep every BatchNorm layer in eval mode, whatever ``model.train()`` says; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train = types.MethodType(_eval_only, m)  # an instance attribute: state dict and class unchanged
            m.eval()
            n += 1
    return n


def split_head(model: nn.Module, groups: list[dict], backbone_lr_scale: float) -> list[dict]:
    """Split each optimizer group into head and backbone; the backbone's lr is scaled by ``backbone_lr_scale``."""
    head = head_parameter_ids(model)
    out = []
    for g in groups:
        params = list(g["params"])
        for part, scale in (([p for p in params if id(p) in head], 1.0),
                            ([p for p in params if id(p) not in head], backbone_lr_scale)):
            if part:
                out.append({**g, "params": part, "lr_scale": g.get("lr_scale", 1.0) * scale})
    return out
