"""The model registry: plain ``nn.Module``s created by name.

Each variant is a small builder function decorated with :func:`register_model`;
:func:`create_model` builds one by name with keyword hyperparameters, checked
against the builder's signature. Names ``timm/<architecture>`` resolve to builders
made on first use from timm's zoo (:mod:`.timm_models`), checked the same way.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch.nn as nn
import torch.nn.functional as F

from ..coerce import coerce_like
from ..errors import ConfigError
from .spec import ModelSpec
from .timm_models import timm_builder

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_SPECS: dict[str, ModelSpec] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, head: str = "", channels_last: bool = True,
                   whitening: bool = False, start_epoch: bool = False, param_groups: bool = False,
                   explain: str = "conv"):
    """Register ``fn(num_classes, **hparams) -> nn.Module`` under its function name, with its capabilities
    (:class:`ModelSpec`): ``@register_model(head="fc")``. ``head`` is required."""

    def deco(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not head:
            raise TypeError(f"register_model({f.__name__}): name the classifier head module (head=...)")
        _REGISTRY[f.__name__] = f
        _SPECS[f.__name__] = ModelSpec(f.__name__, head, channels_last, whitening, start_epoch, param_groups,
                                        explain)
        return f

    return deco(fn) if fn is not None else deco


def model_spec(name: str) -> ModelSpec:
    """The capabilities of a registered model, or of ``timm/<architecture>`` (read from timm's model)."""
    if name in _SPECS:
        return _SPECS[name]
    return _get(name).spec  # timm: the builder made on first use carries its spec


def spec_of(model: nn.Module) -> ModelSpec:
    """The spec :func:`create_model` attached to ``model`` (under any DDP / compile / EMA wrapper), as timm
    attaches ``pretrained_cfg`` to the models it creates."""
    while not hasattr(model, "model_spec") and isinstance(getattr(model, "module", getattr(model, "_orig_mod", None)),
                                                          nn.Module):
        model = getattr(model, "module", None) or model._orig_mod
    spec = getattr(model, "model_spec", None)
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"{type(model).__name__} was not built by cifarlab.models.create_model: its capabilities "
                          f"(head, layout, whitening) are unknown")
    return spec


def classifier_name(model: nn.Module) -> str:
    """The name of the model's head module, as its spec declares it. Fine-tuning trains it first, and loaded
    weights whose head does not fit the classes leave it freshly initialized."""
    return spec_of(model).head


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_defaults(name: str) -> dict[str, Any]:
    """The builder's hyperparameters and their defaults (num_classes excluded)."""
    fn = _get(name)
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if k != "num_classes"}


def validate_model_params(name: str, params: dict[str, Any], image_size: int | None = 32) -> dict[str, Any]:
    """Check that every key is a hyperparameter of the model and has the right type.

    ``image_size`` None (the data will tell it) skips the checks that need it; they run again once it is known.
    """
    defaults = model_defaults(name)
    out = {}
    for key, value in params.items():
        if key not in defaults:
            raise ConfigError(f"unknown config key 'model.{key}' for model '{name}'; "
                              f"its keys are: {', '.join(defaults) or '(none)'}")
        out[key] = coerce_like(f"model.{key}", value, defaults[key])
    if "image_size" in out and image_size is not None and out["image_size"] != image_size:  # the model must be built for the data's size
        raise ConfigError(f"model.image_size={out['image_size']} differs from data.image_size={image_size}; "
                          f"set data.image_size instead")
    checker = getattr(_get(name), "check_params", None)
    if checker is not None:
        merged = {**defaults, **out}
        if "image_size" in defaults and "image_size" not in out:
            merged["image_size"] = image_size
        checker(merged, image_size)
    set_checker = getattr(_get(name), "check_set_params", None)  # timm: builds the model on the meta device
    if set_checker is not None:
        set_checker(out)
    return out


def create_model(name: str, num_classes: int = 10, *, input_size: int = 0, **hparams: Any) -> nn.Module:
    """Build a registered model: ``create_model("vit", 10, patch_size=4)``.

    ``input_size`` (pixels, 0 = off): batches of any other size are resized to it as the model's first
    step (:func:`resize_input`), so that a model pretrained at 224 px takes 32 px images everywhere:
    training, evaluation, prediction and the ONNX export.
    """
    fn = _get(name)
    params = validate_model_params(name, hparams, image_size=hparams.get("image_size", 32))
    model = fn(num_classes=num_classes, **params)
    model.model_spec = model_spec(name)  # a plain attribute: not in the state dict, not a submodule
    if input_size:
        resize_input(model, input_size)
    return model


def create_for_input(name: str, num_classes: int, params: dict[str, Any], input_size: int,
                     image_size: int) -> nn.Module:
    """Build ``name`` for inputs of ``input_size`` pixels from images of ``image_size`` pixels.

    A builder with a size argument (cifarlab's ``image_size``, timm's ``img_size``) is built for
    ``input_size`` unless set; images of another size are resized on the device (``create_model``).
    The one place that decides this, for training (``build_model``) and for loading a run (``Predictor``).
    """
    return create_model(name, num_classes, input_size=input_size if input_size != image_size else 0,
                        **model_kwargs(name, params, input_size))


def model_kwargs(name: str, params: dict[str, Any], input_size: int) -> dict[str, Any]:
    """``params`` with the builder's size argument (``image_size``, timm's ``img_size``) set to ``input_size``
    unless given."""
    params = dict(params)
    defaults = model_defaults(name)
    for key in ("image_size", "img_size"):
        if key in defaults and key not in params:
            params[key] = input_size
    return params


def resize_input(model: nn.Module, size: int) -> nn.Module:
    """Resize (N, C, H, W) inputs to (N, C, size, size) before ``model``'s forward, on the input's device.

    A forward pre-hook, so the state dict, and with it every saved weight file, is that of the bare model.
    Bilinear as torchvision's ``Resize``; antialiased only when shrinking (upscaling needs none, and ONNX
    has no antialiased resize).
    """

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=bool(x.shape[-1] > size or x.shape[-2] > size))
        return (x, *args[1:])

    model.register_forward_pre_hook(hook)
    model.input_size = size
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _get(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY and name.startswith("timm/"):
        return timm_builder(name)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model '{name}'; available: {', '.join(list_models())}, or timm/<architecture>")
    return _REGISTRY[name]
