"""Model registry: plain ``nn.Module``s created by name.

Each variant is a small builder function decorated with :func:`register_model`;
:func:`create_model` builds one by name with keyword hyperparameters, checked
against the builder's signature.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch.nn as nn

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
    from ..config import coerce_like

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
    return out


def create_model(name: str, num_classes: int = 10, **hparams: Any) -> nn.Module:
    """Build a registered model: ``create_model("vit", 10, patch_size=4)``."""
    fn = _get(name)
    params = validate_model_params(name, hparams, image_size=hparams.get("image_size", 32))
    return fn(num_classes=num_classes, **params)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _get(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model '{name}'; available: {', '.join(list_models())}")
    return _REGISTRY[name]


# Importing the modules registers their builders.
from . import cnn, resnet, speednet, vit  # noqa: E402,F401
