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


class Lookahead:
    """airbench's lookahead (Zhang et al., 2019, as in Jordan's airbench94): slow weights pulled along.

    Every ``every`` steps the slow copy moves toward the fast weights, ``slow <- alpha * slow + (1 - alpha) *
    fast``, and the fast weights restart from it (``fast <- slow``); float buffers (BatchNorm running
    statistics) take part. ``alpha = decay ** every * (step / total_steps) ** 3``: no pull at the start,
    where the fast weights must move, and ``decay ** every`` at the end, an average over the last
    ~``every / (1 - decay ** every)`` steps. :meth:`finish` leaves the model on the slow weights.
    """

    def __init__(self, model: nn.Module, decay: float, every: int, total_steps: int):
        self.decay, self.every, self.total_steps = decay, every, max(1, total_steps)
        self.slow = {k: v.detach().clone() for k, v in self._tensors(model).items()}

    @staticmethod
    def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in unwrap(model).state_dict().items() if v.is_floating_point()}

    def alpha(self, step: int) -> float:
        return self.decay ** self.every * (min(step, self.total_steps) / self.total_steps) ** 3

    @torch.no_grad()
    def sync(self, model: nn.Module, alpha: float) -> None:
        fast = self._tensors(model)
        slow = [self.slow[k] for k in fast]
        fast_list = list(fast.values())
        torch._foreach_lerp_(slow, fast_list, 1.0 - alpha)
        torch._foreach_copy_(fast_list, slow)

    def step(self, model: nn.Module, step: int) -> None:
        """Call after optimizer step number ``step`` (1-based, counted over the whole run)."""
        if step % self.every == 0:
            self.sync(model, self.alpha(step))

    def finish(self, model: nn.Module) -> None:
        """Put the slow weights into the model (airbench's final ``update(decay=1.0)``)."""
        self.sync(model, 1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.slow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in self.slow.items():
            v.copy_(state[k])
