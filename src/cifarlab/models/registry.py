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

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn(num_classes, **hparams) -> nn.Module`` under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


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


def classifier_name(model: nn.Module) -> str:
    """The name of the model's head module: timm's ``get_classifier()``, else the first of ``fc``, ``head``,
    ``classifier`` that holds parameters, else the last ``nn.Linear``. Fine-tuning trains it first, and
    loaded weights whose head does not fit the classes leave it freshly initialized."""
    modules = dict(model.named_modules())
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        for n, m in modules.items():
            if m is head and n and any(True for _ in m.parameters()):
                return n
    for n in ("fc", "head", "classifier"):
        if n in modules and any(True for _ in modules[n].parameters()):
            return n
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot find the head of {type(model).__name__}: no fc, head, classifier or nn.Linear")
    return linears[-1]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _get(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY and name.startswith("timm/"):
        from .timm_models import timm_builder

        return timm_builder(name)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model '{name}'; available: {', '.join(list_models())}, or timm/<architecture>")
    return _REGISTRY[name]
