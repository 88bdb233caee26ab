"""The one loader of a trained model, for ``evaluate``, ``predict``, ``export``, ``serve`` and ``cifarlab.load``.

A module of its own, apart from :mod:`.inference`: the training loop imports inference, and this loader
needs the checkpoint and runtime modules of ``train/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..config import RunConfig, load_config
from ..data.loader import Normalize
from ..errors import CifarlabError
from ..models import create_for_input
from ..models.pretrained import input_size
from ..train.checkpoint import load_into, load_weights
from ..train.runtime import Runtime, resolve_device, setup_runtime

# What the weights' sidecar (best.json, an export's .json) must hold to rebuild the model and its preprocessing.
SIDECAR_KEYS = ("model", "num_classes", "classes", "image_size", "mean", "std")


@dataclass
class LoadedModel:
    """A trained model, rebuilt from its weights, with what it needs to run."""

    model: nn.Module  # in eval mode on runtime.device, channels-last where the runtime says
    meta: dict  # the weights' sidecar: model, hparams, classes, image_size, input_size, mean, std, tta, ...
    cfg: RunConfig | None  # the run's config.yaml; None for a bare .safetensors with its .json
    runtime: Runtime
    weights: Path

    @property
    def normalize(self) -> Normalize:
        """The model's input normalization (the training data's mean and std, from the sidecar)."""
        return Normalize(self.meta["mean"], self.meta["std"], self.runtime.device)


def load_model(path: str | Path, device: str = "auto", *, as_trained: bool = False) -> LoadedModel:
    """The one loader of a trained model: a run directory (``best.safetensors``, its ``best.json`` sidecar and
    ``config.yaml``) or a ``.safetensors`` file with its ``.json`` sidecar (an export).

    The sidecar alone is enough to rebuild the model. A run directory adds its config, which then decides the
    architecture (the model's name and hyperparameters, as training built it) and must name the sidecar's model.
    ``as_trained``: run it as the run was trained (the config's device, precision and memory format; a run
    directory is required), as ``cifarlab evaluate`` does. Otherwise fp32 in the default memory format on
    ``device``: ``predict`` and ``export``, whose predictions are few and whose exact probabilities matter more
    than speed."""
    path = Path(path)
    run_dir = None if path.suffix == ".safetensors" else path
    has_config = run_dir is not None and (run_dir / "config.yaml").is_file()
    if as_trained and not has_config:
        raise CifarlabError(f"{path} is not a run directory (no config.yaml)")
    if not path.exists():
        raise CifarlabError(f"run not found: {path}")
    weights = path if run_dir is None else run_dir / "best.safetensors"
    if not weights.is_file():
        raise CifarlabError(f"{path} has no best.safetensors: is it a finished run directory?")
    tensors, meta = load_weights(weights)
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise CifarlabError(f"{weights.with_suffix('.json')} lacks {', '.join(missing)}")
    cfg = load_config(run_dir / "config.yaml") if has_config else None
    if cfg is not None:
        if meta["model"] != cfg.model.name:
            raise CifarlabError(f"{weights} holds a {meta['model']!r} model, config says {cfg.model.name!r}")
        name, params, image_size = cfg.model.name, cfg.model.params, cfg.data.image_size
        # The sidecar's input size is what training used, also where a fine-tuned run's starting weights
        # (which input_size(cfg) reads) are no longer on this machine.
        size = int(meta.get("input_size") or input_size(cfg))
    else:
        name, params, image_size = meta["model"], dict(meta.get("hparams") or {}), int(meta["image_size"])
        size = int(meta.get("input_size") or image_size)  # a pretrained model's: it resizes the images itself
    model = create_for_input(name, int(meta["num_classes"]), params, size, image_size)
    load_into(model, tensors, str(weights))
    if as_trained:
        if device != "auto":
            cfg.train.device = device
        rt = setup_runtime(cfg.train, cfg.model.name)
    else:
        rt = Runtime(resolve_device(device), "fp32", channels_last=False)
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return LoadedModel(model.eval(), meta, cfg, rt, weights)
