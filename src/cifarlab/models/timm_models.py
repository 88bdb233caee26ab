"""timm's model zoo behind cifarlab's registry: ``model.name: timm/<architecture>``.

``timm_builder("timm/resnet18")`` returns a builder like cifarlab's own (``fn(num_classes, **hparams)``)
whose signature lists the keyword arguments of the timm model class (``drop_rate``,
``drop_path_rate``, ``img_size``, ...), so that :func:`cifarlab.models.validate_model_params` checks
the config's keys and types exactly as for the built-in models; the values are then checked by
building the model on the meta device (no memory, no init), so a bad value fails at config time
with timm's own message. ``pretrained`` is not a builder argument: the weights are loaded by
:mod:`cifarlab.models.pretrained` (from the Hugging Face cache, or a local file).

timm is an optional extra (``pip install 'cifarlab[timm]'``) and imported only for timm/ names.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from .spec import ModelSpec

PREFIX = "timm/"
# Class arguments that cifarlab sets (num_classes), that belong to weights loading (pretrained*) or that
# would make the model something other than a classifier of RGB images (features_only, in_chans).
_NOT_HPARAMS = {"self", "num_classes", "in_chans", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                "pretrained_strict", "features_only", "checkpoint_path", "cache_dir", "device", "dtype"}


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def require_timm():
    try:
        import timm
    except ModuleNotFoundError:
        raise ConfigError("timm/ models need timm: pip install 'cifarlab[timm]'") from None
    return timm


def architecture(name: str) -> str:
    return name[len(PREFIX):]


@functools.lru_cache(maxsize=None)
def timm_builder(name: str) -> Callable[..., nn.Module]:
    """The builder of ``timm/<architecture>``, with the model class's keyword arguments as its signature."""
    timm = require_timm()
    arch = architecture(name)
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else \
            " (timm.list_models() lists them)"
        raise ConfigError(f"unknown timm architecture '{arch}' in model.name={name!r}{hint}")
    with torch.device("meta"):  # the class and its arguments, without allocating or initializing anything
        probe = timm.create_model(arch, pretrained=False)
    params = [inspect.Parameter("num_classes", inspect.Parameter.KEYWORD_ONLY, default=10)]
    for p in inspect.signature(type(probe).__init__).parameters.values():
        if p.name in _NOT_HPARAMS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        # Arguments without a default (ResNet's block, layers) are set by the architecture's entry point.
        default = None if p.default is inspect.Parameter.empty else p.default
        params.append(inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=_plain(default)))

    def build(num_classes: int = 10, **hparams: Any) -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **hparams)

    def check_set_params(hparams: dict[str, Any]) -> None:
        try:
            with torch.device("meta"):
                timm.create_model(arch, pretrained=False, num_classes=10, **hparams)
        except Exception as e:  # timm raises TypeError, ValueError, AssertionError ... for bad arguments
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"timm cannot build {name} with {hparams}: {msg}") from None

    build.__signature__ = inspect.Signature(params)  # what model_defaults / validate_model_params read
    build.__name__ = build.__qualname__ = name
    build.check_set_params = check_set_params
    build.pretrained_cfg = dict(probe.pretrained_cfg)  # input size, mean, std, weights source
    build.spec = _spec(name, arch, probe)
    return build


# timm's modules of attention models: channels-last gains nothing there (and costs a layout change per step).
TRANSFORMER_MODULES = ["vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos",
                       "vision_transformer_sam", "deit", "beit", "eva", "cait", "xcit", "crossvit", "pit", "tnt",
                       "twins", "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr", "mvitv2",
                       "levit", "volo", "sequencer", "mlp_mixer", "hiera", "naflexvit"]


def _spec(name: str, arch: str, probe: nn.Module):
    """A timm model's :class:`~cifarlab.models.registry.ModelSpec`: its head is what its ``get_classifier()``
    returns (timm's API for it), its layout follows its module (attention models stay channels-first)."""
    from timm.models import is_model_in_modules

    head_module = probe.get_classifier()
    head = next((n for n, m in probe.named_modules() if m is head_module and n), "")
    if not head:
        raise ConfigError(f"{name}: timm's get_classifier() names no submodule; it cannot be fine-tuned here")
    transformer = is_model_in_modules(arch, TRANSFORMER_MODULES)
    return ModelSpec(name, head, channels_last=not transformer, explain=_explain_kind(arch, probe, transformer))


# timm's ViTs whose blocks carry (B, prefix + N, D) tokens: Grad-CAM explains their patch tokens. Other attention
# models (Swin's (B, H, W, C) stages, SAM's windows, NaFlex's variable grids) are not explained.
TOKEN_MODULES = ["vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos", "deit", "beit",
                 "eva"]


def _explain_kind(arch: str, probe: nn.Module, transformer: bool) -> str:
    """The spec's ``explain``: "conv" for conv nets, "tokens" for ViTs with a last block's ``norm1``, else ""."""
    from timm.models import is_model_in_modules

    if not transformer:
        return "conv"
    blocks = getattr(probe, "blocks", None)
    if is_model_in_modules(arch, TOKEN_MODULES) and isinstance(blocks, nn.Sequential) and len(blocks) \
            and isinstance(getattr(blocks[-1], "norm1", None), nn.Module):
        return "tokens"
    return ""


def _plain(value: Any) -> Any:
    """A default that config coercion understands: tuples as lists; classes and functions as None (any value)."""
    if isinstance(value, tuple):
        return list(value)
    if value is None or isinstance(value, (bool, int, float, str, list)):
        return value
    return None


def pretrained_cfg(name: str) -> dict[str, Any]:
    return timm_builder(name).pretrained_cfg
