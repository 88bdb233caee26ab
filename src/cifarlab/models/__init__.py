"""Models: plain ``nn.Module``s created by name through the registry (:mod:`.registry`).

Each variant is a small builder function decorated with :func:`register_model` in its own module;
importing this package imports those modules, which registers their builders.
"""

from .registry import (ModelSpec, classifier_name, count_parameters, create_for_input, create_model, list_models,  # noqa: F401
                       model_defaults, model_kwargs, model_spec, register_model, resize_input, spec_of,
                       validate_model_params)
from . import cnn, resnet, speednet, vit  # noqa: E402,F401  (registers their builders)
from .pretrained import build_model  # noqa: E402,F401
