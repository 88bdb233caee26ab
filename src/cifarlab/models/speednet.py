"""SpeedNet: a small conv net built for time-to-accuracy on 32x32 images.

Follows airbench94 (Jordan, 2024, "94% on CIFAR-10 in 3.29 seconds on a single
GPU", arXiv 2404.00498), itself derived from hlb-cifar10 and Page's ResNet-9
(myrtle.ai, "How to train your ResNet"):

* a 2x2 stem conv whose filters are the eigenvectors of the covariance of 2x2
  patches of training images, scaled by 1/sqrt(eigenvalue): the stem outputs
  whitened patches from the first step on. Its weights are frozen, its bias
  trains. The filters come in +/- pairs so that GELU keeps both signs.
  This needs data at initialisation: :meth:`SpeedNet.init_whitening`, which
  ``cifarlab.train.fit`` calls before training (not on resume).
* three blocks of conv3x3 -> max-pool -> BN -> GELU -> conv3x3 -> BN -> GELU,
  widths 64/256/256; conv filters start as identity (dirac) on their first
  ``in_channels`` outputs, an implicit residual.
* global max-pool and a bias-free linear head whose output is multiplied by
  1/9, which keeps the initial logits small under the large learning rates of
  the recipe.

BatchNorm settings for short schedules (airbench's ablations):

* no affine weight (fixed at 1): with the following conv scale-invariant, a
  learned scale only adds a direction that weight decay fights.
* eps 1e-12 instead of 1e-5: with whitened inputs some channels have tiny
  variance early, and 1e-5 would damp them.
* running-statistics momentum 0.1 by default (PyTorch convention). airbench
  uses 0.4 together with its lookahead optimizer (``train.lookahead``), and
  so does ``configs/speedrun.yaml``: the lookahead also averages the running
  statistics, which then must follow the fast weights quickly.
* the BN biases train with a learning rate ``bias_lr_scale`` (64) times the
  base rate and a weight decay divided by it, so their decay per step stays
  that of the other weights, as in airbench94 (:meth:`SpeedNet.param_groups`,
  used by ``cifarlab.train.optim.build_optimizer``); ``bias_decay`` scales
  their decay per step relative to the other weights' (0 = none).
* ``whiten_bias_epochs``: the stem's bias trains for this many epochs and is
  then frozen (airbench94: 3 of its 9.9); None (the default) trains it all run.
  ``whiten_bias_anneal`` (airbench94_muon): over those epochs its learning rate
  falls linearly to zero on its own schedule, and it takes the BN biases'
  learning rate and decay (its own optimizer group, ``anneal_epochs``).
  ``cifarlab.train.fit`` calls :meth:`SpeedNet.start_epoch` before each epoch.
* the stem runs in fp32 even under bf16 autocast: its filters amplify the
  weakest patch directions up to 1/sqrt(eps) = 45x, and bf16's 8-bit mantissa
  would amplify its rounding error with them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .registry import register_model


class Conv(nn.Conv2d):
    """3x3 'same' conv without bias whose first ``in_channels`` filters start as the identity."""

    def __init__(self, cin: int, cout: int, dirac: bool = True):
        self.dirac = dirac
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.dirac:
            w = self.weight.data
            nn.init.dirac_(w[:min(w.shape[0], w.shape[1])])


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a fixed unit scale and a trainable bias."""

    def __init__(self, num_features: int, momentum: float, eps: float, affine_weight: bool):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.weight.requires_grad_(affine_weight)


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int, bn_momentum: float, bn_eps: float, bn_weight: bool, dirac: bool):
        super().__init__()
        self.conv1 = Conv(cin, cout, dirac)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(cout, bn_momentum, bn_eps, bn_weight)
        self.conv2 = Conv(cout, cout, dirac)
        self.norm2 = BatchNorm(cout, bn_momentum, bn_eps, bn_weight)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))  # (B, cout, H/2, W/2)
        return self.act(self.norm2(self.conv2(x)))


class SpeedNet(nn.Module):
    def __init__(self, num_classes: int, widths: list[int], whiten_kernel: int, bn_momentum: float,
                 bn_eps: float, bn_weight: bool, dirac: bool, head_scale: float, bias_lr_scale: float,
                 bias_decay: float = 1.0, whiten_bias_epochs: float | None = None, head_std: float = 0.0,
                 whiten_bias_anneal: bool = False):
        super().__init__()
        self.whiten_bias_epochs = whiten_bias_epochs
        self.whiten_bias_anneal = whiten_bias_anneal
        k = whiten_kernel
        self.whiten = nn.Conv2d(3, 2 * 3 * k * k, kernel_size=k, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from data by init_whitening, then fixed
        nn.init.zeros_(self.whiten.bias)
        blocks, cin = [], self.whiten.out_channels
        for w in widths:
            blocks.append(ConvGroup(cin, w, bn_momentum, bn_eps, bn_weight, dirac))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes, bias=False)
        if head_std:  # airbench94_muon: unit-std head weights under a 1 / width output scale
            with torch.no_grad():
                self.head.weight.mul_(head_std / self.head.weight.std())
        self.head_scale = head_scale
        self.bias_lr_scale = bias_lr_scale
        self.bias_decay = bias_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # fp32 stem: see the module docstring
            x = F.gelu(self.whiten(x.float()))  # (B, 24, H-1, W-1) for k=2
        x = self.blocks(x)  # (B, widths[-1], ~H/8, ~W/8)
        x = torch.amax(x, dim=(2, 3))  # global max-pool: (B, widths[-1])
        return self.head(x) * self.head_scale  # (B, num_classes)

    def start_epoch(self, epoch: int) -> None:
        """Freeze the stem's bias from epoch ``whiten_bias_epochs`` on (0-based ``epoch``), as airbench94 does."""
        self.whiten.bias.requires_grad_(self.whiten_bias_epochs is None or epoch < self.whiten_bias_epochs)

    # ----------------------------------------------------------- data-dependent init
    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4, max_images: int = 5000) -> None:
        """Set the stem to whiten ``k x k`` patches of ``images`` (airbench's ``init_whitening_conv``).

        ``images``: (N, 3, H, W), either normalized floats exactly as the model will see them or uint8
        (then normalized here by their own per-channel mean and std, which equals cifarlab's input
        normalization when they are the training split). The patch second-moment matrix is
        eigendecomposed; filter i is eigenvector i / sqrt(eigenvalue i + eps), so on these images the
        first half of the stem's outputs (before bias) have covariance ~identity, up to eps.
        Only the first ``max_images`` are used: pass a random sample, not a class-sorted set (``fit``
        passes 5000 training images drawn by ``cifarlab.train.loop.whitening_sample``).
        """
        x = images[:max_images]
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
            x = (x - mean) / std
        x = x.float().to(self.whiten.weight.device)
        k = self.whiten.kernel_size[0]
        c = x.shape[1]
        # (N, C, H-k+1, W-k+1, k, k) -> one row per patch, in the (C, k, k) order of a conv filter
        patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
        cov = patches.T @ patches / len(patches)
        eigval, eigvec = torch.linalg.eigh(cov)  # ascending
        eigval, eigvec = eigval.flip(0), eigvec.flip(1)  # strongest direction first
        filters = (eigvec.T / torch.sqrt(eigval.clamp_min(0) + eps)[:, None]).reshape(c * k * k, c, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight.dtype))

    # ------------------------------------------------------------- optimizer groups
    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups: BN biases at ``bias_lr_scale`` x the learning rate (airbench's bias_scaler).

        ``lr_scale`` multiplies the group's learning rate; the decoupled decay per step is lr * wd, so the
        BN group's wd is ``bias_decay / bias_lr_scale`` x the others' for a decay per step ``bias_decay`` x
        theirs (1 by default: the same).
        """
        anneal = self.whiten_bias_anneal and self.whiten_bias_epochs
        own = [self.whiten.bias] if anneal and self.whiten.bias.requires_grad else []
        norm = [p for n, p in self.named_parameters() if ".norm" in n and p.requires_grad]
        other = [p for n, p in self.named_parameters()
                 if ".norm" not in n and p.requires_grad and not any(p is q for q in own)]
        bias = {"weight_decay": weight_decay * self.bias_decay / self.bias_lr_scale, "lr_scale": self.bias_lr_scale}
        groups = [{"params": other, "weight_decay": weight_decay, "lr_scale": 1.0}, {"params": norm, **bias}]
        # The stem's bias under whiten_bias_anneal: the BN biases' settings, its lr to zero over its epochs.
        return groups + ([{"params": own, **bias, "anneal_epochs": float(self.whiten_bias_epochs)}] if own else [])


@register_model(head="head", whitening=True, start_epoch=True, param_groups=True)
def speednet(num_classes: int = 10, *, widths: list[int] = [64, 256, 256], whiten_kernel: int = 2,  # noqa: B006
             bn_momentum: float = 0.1, bn_eps: float = 1e-12, bn_weight: bool = False, dirac: bool = True,
             head_scale: float = 1 / 9, bias_lr_scale: float = 64.0, bias_decay: float = 1.0,
             whiten_bias_epochs: float | None = None, head_std: float = 0.0,
             whiten_bias_anneal: bool = False) -> nn.Module:
    return SpeedNet(num_classes, list(widths), whiten_kernel, bn_momentum, bn_eps, bn_weight, dirac, head_scale,
                    bias_lr_scale, bias_decay, whiten_bias_epochs, head_std, whiten_bias_anneal)


def _check(p: dict, image_size: int) -> None:
    if len(p["widths"]) != 3 or min(p["widths"]) < 1:
        raise ConfigError(f"model.widths={p['widths']} must be three positive channel counts")
    if p["whiten_kernel"] < 1 or p["whiten_kernel"] > 4:
        raise ConfigError(f"model.whiten_kernel={p['whiten_kernel']} must be in 1..4")
    if not 0 < p["bn_momentum"] <= 1:
        raise ConfigError(f"model.bn_momentum={p['bn_momentum']} must be in (0, 1] (PyTorch convention)")
    if p["bn_eps"] <= 0:
        raise ConfigError(f"model.bn_eps={p['bn_eps']} must be > 0")
    if p["head_scale"] <= 0 or p["bias_lr_scale"] <= 0:
        raise ConfigError("model.head_scale and model.bias_lr_scale must be > 0")
    if p["whiten_bias_epochs"] is not None and p["whiten_bias_epochs"] < 0:
        raise ConfigError(f"model.whiten_bias_epochs={p['whiten_bias_epochs']} must be >= 0 (or null: never frozen)")
    if p["head_std"] < 0:
        raise ConfigError(f"model.head_std={p['head_std']} must be >= 0 (0: PyTorch's initialization)")
    if p["bias_decay"] < 0:
        raise ConfigError(f"model.bias_decay={p['bias_decay']} must be >= 0")
    if image_size is not None and (image_size - p["whiten_kernel"] + 1) // 8 < 1:
        raise ConfigError(f"image size {image_size} is too small for speednet's three 2x poolings")


speednet.check_params = _check
