"""ResNet18 from torchvision (He et al., 2016) with a ``num_classes`` head.

``cifar_stem=True`` swaps the ImageNet stem (7x7 stride-2 conv + max-pool, which
shrinks a 32x32 image to 8x8 before the first block) for a 3x3 stride-1 conv and
no pool, the usual stem for CIFAR-sized inputs.

Speed: with the ImageNet stem, the last stage sees 1x1 feature maps, where a 3x3 convolution
with padding 1 is a matrix product with the kernel's centre tap (the other eight taps only meet
zero padding). oneDNN computes all nine taps, and its backward pass is slow at this shape: on
the project's CPU three such layers took 48 ms of a 220 ms training step in bf16.
:class:`CentreTapConv2d` takes the matrix product there and is ``nn.Conv2d`` otherwise. Outputs
and gradients are the same function (the eight outer taps' gradients are exactly zero either
way); weights and state-dict keys are unchanged.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


class CentreTapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes a 3x3, stride-1, padding-1 convolution of a 1x1 map as a linear layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.shape[-2:] == (1, 1) and self.kernel_size == (3, 3) and self.stride == (1, 1)
                and self.padding == (1, 1) and self.dilation == (1, 1) and self.groups == 1
                and self.padding_mode == "zeros"):
            y = F.linear(x.flatten(1), self.weight[:, :, 1, 1], self.bias)  # (B, C_out)
            return y[:, :, None, None]  # (B, C_out, 1, 1): one layout, both contiguous and channels-last
        return super().forward(x)


@register_model(head="fc")
def resnet18(num_classes: int = 10, *, cifar_stem: bool = False) -> nn.Module:
    # Imported here: torchvision's package import (which pulls in torch._dynamo) costs 1.3 s of every
    # `cifarlab train` start on a 2-core CPU, also for runs that never build a ResNet.
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    for m in model.modules():
        if type(m) is nn.Conv2d and m.kernel_size == (3, 3):
            m.__class__ = CentreTapConv2d  # same parameters and buffers; only forward differs
    return model
