"""The study's small CNN: three conv3x3 + BatchNorm + ReLU + MaxPool blocks,
flatten, and a two-layer MLP with dropout. It returns logits; apply softmax
where probabilities are needed."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError
from .registry import register_model


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, widths: list[int], hidden: int, dropout: float, image_size: int):
        super().__init__()
        blocks, cin = [], 3
        for w in widths:
            blocks += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*blocks)
        side = image_size // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, widths[-1], H/8, W/8)
        return self.classifier(x)  # (B, num_classes)


@register_model(head="classifier")
def cnn(num_classes: int = 10, *, widths: list[int] = [64, 128, 256], hidden: int = 512,  # noqa: B006
        dropout: float = 0.5, image_size: int = 32) -> nn.Module:
    return SmallCNN(num_classes, list(widths), hidden, dropout, image_size)


def _check(p: dict, image_size: int) -> None:
    if len(p["widths"]) != 3 or min(p["widths"]) < 1:
        raise ConfigError(f"model.widths={p['widths']} must be three positive channel counts")
    if p["hidden"] < 1:
        raise ConfigError(f"model.hidden={p['hidden']} must be >= 1")
    if not 0 <= p["dropout"] < 1:
        raise ConfigError(f"model.dropout={p['dropout']} must be in [0, 1)")
    if p["image_size"] is not None and p["image_size"] < 8:  # floor pooling: 28 px -> 14 -> 7 -> 3
        raise ConfigError(f"image size {p['image_size']} is too small for the CNN's three 2x poolings (>= 8)")


cnn.check_params = _check
