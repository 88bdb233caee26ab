"""A Vision Transformer written here (Dosovitskiy et al., 2021, "An Image is Worth
16x16 Words"), pre-norm as in timm's ``VisionTransformer``.

Layout follows the study: Conv2d patch embedding (kernel = stride = patch size),
or, with ``stem_channels``, a convolutional stem (Xiao et al., 2021, "Early
Convolutions Help Transformers See Better": 3x3 conv-BN-ReLU layers, the last
log2(patch_size) of them with stride 2, then a 1x1 projection to ``embed_dim``;
the token grid is the same as with patches), a class token, learnable position
embeddings, ``num_encoder_layers`` pre-norm encoder layers, and an MLP head with
one hidden layer. Attention heads have ``head_dim`` each, so the inner width
``num_heads * head_dim`` may differ from ``embed_dim``.

Speed: Q, K and V come from one fused Linear, and attention runs through
``F.scaled_dot_product_attention``. The study applied dropout to the attention
weights; on the CPU that forces SDPA onto its unfused math path, which
materialises and masks every (heads x tokens x tokens) map (over half of each
step for the study's ViT). By default (``attn_dropout_on_weights=False``) the
same dropout rate is applied to the attention *output* instead, which keeps the
fused kernel. In eval mode both compute the identical function; set
``attn_dropout_on_weights=True`` for the study's exact training regularisation.

On the CPU two more choices, each measured on this project's 2-core AVX512-BF16 machine
(benchmarks/throughput.py): under bf16 autocast the attention itself runs in fp32, because
PyTorch's bf16 flash kernel for CPUs without AMX was slower than its fp32 one (study ViT,
per layer and 32 images: 73 + 331 ms forward + backward in bf16, 62 + 139 ms in fp32; also
slower for head_dim 32 and 64); q, k and v are rounded to bf16 either way, so fp32 is only
more exact. And dropout draws its masks with :func:`cifarlab.models.dropout.dropout`, 3x
faster than ``F.dropout`` there. Both leave the computed function unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .registry import register_model
from .dropout import Dropout, dropout


def _attention_in_fp32(x: torch.Tensor) -> bool:
    """Low-precision SDPA on a CPU without AMX tiles: fp32 was faster there (see the module docstring)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not _cpu_has_amx()


def _cpu_has_amx() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class ConvStem(nn.Module):
    """3x3 conv-BN-ReLU layers, the last ``log2(patch_size)`` with stride 2, then a 1x1 conv to ``embed_dim``:
    the same (B, N, D) tokens as :class:`PatchEmbed` with the same patch size. Short runs on small images
    are where this stem pays: the convolutions give the tokens a locality prior that patch projections
    must learn from data (Xiao et al., 2021; the CCT paper's tokenizer, Hassani et al., 2021, is akin)."""

    def __init__(self, patch_size: int, embed_dim: int, channels: list[int], in_chans: int = 3):
        super().__init__()
        strided = patch_size.bit_length() - 1  # log2 of a power of two, checked in _check
        layers, c_in = [], in_chans
        for i, c in enumerate(channels):
            stride = 2 if i >= len(channels) - strided else 1
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True)]
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.convs(x))  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, dropout: float, dropout_on_weights: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.dropout = dropout
        self.dropout_on_weights = dropout_on_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dtype = qkv.dtype
        if _attention_in_fp32(qkv):
            qkv = qkv.float()
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        p = self.dropout if (self.training and self.dropout_on_weights) else 0.0
        with torch.autocast(q.device.type, enabled=False) if q.dtype != dtype else contextlib.nullcontext():
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, heads, N, head_dim)
        x = x.to(dtype).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        if not self.dropout_on_weights:
            x = dropout(x, self.dropout, self.training)
        return self.proj(x)  # (B, N, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm encoder layer: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, num_heads, head_dim, mlp_hidden, dropout, dropout_on_weights):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, head_dim, dropout, dropout_on_weights)
        self.drop = Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, num_classes: int, image_size: int, patch_size: int, embed_dim: int,
                 num_encoder_layers: int, num_heads: int, head_dim: int, hidden_layer_depth: int,
                 dropout: float, mlp_head_hidden_layer_depth: int, attn_dropout_on_weights: bool,
                 stem_channels: list[int] | None = None):
        super().__init__()
        self.patch_embed = (ConvStem(patch_size, embed_dim, list(stem_channels)) if stem_channels
                            else PatchEmbed(patch_size, embed_dim))
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim) * 0.02)
        self.pos_drop = Dropout(dropout)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, head_dim, hidden_layer_depth, dropout, attn_dropout_on_weights)
            for _ in range(num_encoder_layers)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Sequential(
            nn.Linear(embed_dim, mlp_head_hidden_layer_depth),
            nn.GELU(),
            Dropout(dropout),
            nn.Linear(mlp_head_hidden_layer_depth, num_classes),
        )
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N+1, D)
        x = self.blocks(self.pos_drop(x))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0])  # class token -> (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@register_model(head="head", channels_last=False, explain="tokens")
def vit(num_classes: int = 10, *, image_size: int = 32, patch_size: int = 4, embed_dim: int = 192,
        num_encoder_layers: int = 6, num_heads: int = 3, head_dim: int = 64, hidden_layer_depth: int = 384,
        dropout: float = 0.1, mlp_head_hidden_layer_depth: int = 384,
        attn_dropout_on_weights: bool = False, stem_channels: list[int] | None = None) -> nn.Module:
    """``stem_channels`` empty or None: the study's patch embedding; a list of widths: a convolutional stem
    (:class:`ConvStem`; ``patch_size`` must then be a power of two with log2(patch_size) <= its length)."""
    return VisionTransformer(num_classes, image_size, patch_size, embed_dim, num_encoder_layers, num_heads,
                             head_dim, hidden_layer_depth, dropout, mlp_head_hidden_layer_depth,
                             attn_dropout_on_weights, stem_channels)


def _check(p: dict, image_size: int) -> None:
    size = p["image_size"]
    if p["patch_size"] < 1 or (size is not None and size % p["patch_size"]):
        raise ConfigError(f"model.patch_size={p['patch_size']} must divide the image size {size}")
    if p["num_heads"] < 1 or p["head_dim"] < 1:  # a product test alone lets (-2) * (-3) through
        raise ConfigError(f"model.num_heads*model.head_dim = {p['num_heads']}*{p['head_dim']} must be > 0")
    for key in ("embed_dim", "num_encoder_layers", "hidden_layer_depth", "mlp_head_hidden_layer_depth"):
        if p[key] < 1:
            raise ConfigError(f"model.{key}={p[key]} must be >= 1")
    if not 0 <= p["dropout"] < 1:
        raise ConfigError(f"model.dropout={p['dropout']} must be in [0, 1)")
    stem = p.get("stem_channels") or []
    if not isinstance(stem, (list, tuple)):
        raise ConfigError(f"model.stem_channels={stem!r} must be a list of widths, e.g. [32, 64, 128]")
    if stem:
        patch = p["patch_size"]
        if patch & (patch - 1) or patch.bit_length() - 1 > len(stem):
            raise ConfigError(f"model.stem_channels={list(stem)}: a convolutional stem needs a power-of-two "
                              f"patch_size (got {patch}) and at least log2(patch_size) layers, one per stride 2")
        if any(not isinstance(c, int) or c < 1 for c in stem):
            raise ConfigError(f"model.stem_channels={list(stem)} must be positive integers")


vit.check_params = _check
