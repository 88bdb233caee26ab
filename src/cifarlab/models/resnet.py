"""ResNet18 from torchvision (He et al., 2016) with a ``num_classes`` head.

``cifar_stem=True`` swaps the ImageNet stem (7x7 stride-2 conv + max-pool, which
shrinks a 32x32 image to 8x8 before the first block) for a 3x3 stride-1 conv and
no pool, the usual stem for CIFAR-sized inputs.
"""

import torch.nn as nn
from torchvision.models import resnet18 as tv_resnet18

from . import register_model


@register_model
def resnet18(num_classes: int = 10, *, cifar_stem: bool = False) -> nn.Module:
    model = tv_resnet18(weights=None, num_classes=num_classes)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model
