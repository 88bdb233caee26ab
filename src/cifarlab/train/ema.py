"""Exponential moving average of the weights (Polyak averaging), evaluated and saved in place of the raw weights.

Built on ``torch.optim.swa_utils.AveragedModel`` with its EMA averaging function;
buffers (BatchNorm statistics) are averaged too.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .checkpoint import unwrap


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.averaged = AveragedModel(copy.deepcopy(unwrap(model)), multi_avg_fn=get_ema_multi_avg_fn(decay),
                                      use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(unwrap(model))
