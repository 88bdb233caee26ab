"""Starting weights: published ImageNet weights (``model.pretrained``) or a local file (``model.weights``).

* ``resnet18`` + ``pretrained: true``: torchvision's ``ResNet18_Weights.IMAGENET1K_V1``, downloaded
  on first use into torch's hub cache (``$TORCH_HOME/hub/checkpoints/``, as
  ``torchvision.models.resnet18(weights=...)`` would) and loaded with ``weights_only=True``.
* ``timm/<arch>`` + ``pretrained: true``: timm's weights from the Hugging Face cache
  (``$HF_HOME/hub/models--timm--<tag>/``), loaded by timm itself so that its checkpoint filters
  apply (a ViT's position embeddings are resampled for another ``img_size``).
* ``weights: PATH``: a state dict of the same architecture, a ``.safetensors`` file or a torch file
  read with ``weights_only=True`` (a cifarlab ``best.safetensors`` or ``last.pt`` too). With
  ``pretrained: true`` it replaces the download: the same weights, from a file you placed.

In every case the head is replaced when its shape does not fit the data's classes (it keeps its
fresh initialization), and any other tensor that does not fit is an error naming it. Without a
network the download fails with one line naming the file to place in the cache.

The input the weights expect becomes the run's default (:func:`input_size`, :func:`input_norm`):
torchvision's weight transforms (224 px crop, ImageNet mean and std) or timm's ``pretrained_cfg``
(``input_size``, ``mean``, ``std``); ``model.input_size`` / ``model.mean`` / ``model.std`` override
them. ``CIFARLAB_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1`` for timm) never tries the network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from .registry import classifier_name, create_for_input, model_kwargs
from .timm_models import architecture, is_timm, pretrained_cfg, require_timm

# A cifarlab.config.RunConfig: config imports this module to validate a run, so this one does not import config.
RunConfig = Any

# cifarlab model -> torchvision weights enum and member (the study's ResNet18 is torchvision's).
TORCHVISION_WEIGHTS = {"resnet18": ("ResNet18_Weights", "IMAGENET1K_V1")}


@dataclass
class InputSpec:
    """What a model's starting weights expect: side in pixels and per-channel normalization."""

    size: int | None
    mean: list[float] | None
    std: list[float] | None
    source: str  # for messages: "torchvision ResNet18_Weights.IMAGENET1K_V1", "timm test_resnet.r160_in1k", a file


# --------------------------------------------------------------------------- specs
def _torchvision_weights(name: str):
    from torchvision import models as tvm  # late: torchvision's import costs a second (see models/resnet.py)

    enum, member = TORCHVISION_WEIGHTS[name]
    return getattr(getattr(tvm, enum), member)


def pretrained_spec(name: str) -> InputSpec:
    """The input the published weights of ``name`` were trained with (no download)."""
    if is_timm(name):
        c = pretrained_cfg(name)
        tag = f"{c.get('architecture')}.{c['tag']}" if c.get("tag") else str(c.get("architecture"))
        return InputSpec(int(c["input_size"][-1]), list(c["mean"]), list(c["std"]), f"timm {tag}")
    w = _torchvision_weights(name)
    tf = w.transforms()  # ImageClassification(crop_size=224, resize_size=256, mean, std)
    return InputSpec(int(tf.crop_size[0]), list(tf.mean), list(tf.std), f"torchvision {type(w).__name__}.{w.name}")


def file_spec(path: str | Path) -> InputSpec | None:
    """The input a weights file expects, from its cifarlab JSON sidecar (``best.json``) when it has one."""
    side = Path(path).with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or "mean" not in meta or "std" not in meta:
        return None
    size = meta.get("input_size") or meta.get("image_size")
    return InputSpec(int(size) if size else None, list(meta["mean"]), list(meta["std"]), str(path))


def start_spec(cfg: RunConfig) -> InputSpec | None:
    """The spec of the run's starting weights: the published ones, else a file's sidecar, else None."""
    m = cfg.model
    if m.pretrained:
        return pretrained_spec(m.name)
    if m.weights:
        return file_spec(m.weights)
    return None


def input_size(cfg: RunConfig) -> int:
    """Pixels the model sees: model.input_size, else timm's img_size if set, else the starting weights', else
    data.image_size."""
    m = cfg.model
    if m.input_size:
        return m.input_size
    for key in ("img_size", "image_size"):
        if key in m.params:
            v = m.params[key]
            return int(v[-1] if isinstance(v, (list, tuple)) else v)
    spec = start_spec(cfg)
    return spec.size if spec is not None and spec.size else cfg.data.image_size


def input_norm(cfg: RunConfig, data_mean: list[float], data_std: list[float]) -> tuple[list[float], list[float]]:
    """(mean, std) of the inputs: model.mean/std, else the starting weights', else the training split's."""
    m = cfg.model
    spec = start_spec(cfg)
    mean = m.mean or (spec.mean if spec is not None and spec.mean else None) or data_mean
    std = m.std or (spec.std if spec is not None and spec.std else None) or data_std
    return list(mean), list(std)


def check_model_config(cfg: RunConfig) -> None:
    """Config-time checks of pretrained / weights / input_size / mean / std (no file is opened)."""
    m = cfg.model
    if m.pretrained:
        if is_timm(m.name):
            c = pretrained_cfg(m.name)
            if not (c.get("hf_hub_id") or c.get("url")):
                raise ConfigError(f"model.pretrained: timm has no published weights for {m.name}")
        elif m.name not in TORCHVISION_WEIGHTS:
            raise ConfigError(f"model.pretrained: there are no published weights for {m.name!r} (there are for "
                              f"{', '.join(TORCHVISION_WEIGHTS)} and timm/ models); use model.weights=PATH for a file")
        elif m.params.get("cifar_stem"):
            raise ConfigError("model.pretrained: the ImageNet weights of resnet18 fit its ImageNet stem only; "
                              "set model.cifar_stem=false (the 32 px images are upscaled to the weights' size)")
    if m.weights is not None and not str(m.weights).strip():
        raise ConfigError("model.weights must be a file path (or null)")
    if not (m.input_size == 0 or m.input_size >= 8):
        raise ConfigError(f"model.input_size={m.input_size!r} must be 0 (auto) or >= 8 pixels")
    for key, v in (("mean", m.mean), ("std", m.std)):
        if v is not None and len(v) != 3:
            raise ConfigError(f"model.{key}={v!r} must be 3 numbers (R, G, B) in [0, 1] units, or null")
    if m.std is not None and min(m.std) <= 0:
        raise ConfigError(f"model.std={m.std!r} must be positive")


# --------------------------------------------------------------------------- loading
def offline() -> bool:
    return os.environ.get("CIFARLAB_OFFLINE", "") not in ("", "0")


def torchvision_cache_file(name: str) -> Path:
    """Where ``torchvision`` (``torch.hub.load_state_dict_from_url``) keeps the downloaded weights of ``name``."""
    w = _torchvision_weights(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it at its import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def timm_cache_file(name: str) -> tuple[Path | None, Path]:
    """(the cached weights file of timm/<arch> if present, the path to place it at otherwise)."""
    c = pretrained_cfg(name)
    repo = str(c["hf_hub_id"]).split("@")[0]
    folder = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename, cache_dir=str(hf_cache_dir()))
        if isinstance(hit, str):
            return Path(hit), folder / "snapshots" / "main" / "model.safetensors"
    return None, folder / "snapshots" / "main" / "model.safetensors"


def _download_failed(what: str, place: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"cannot download the pretrained weights of {what} ({reason}); without a network, place "
                           f"the file at {place} or pass --set model.weights=FILE")


def _fetch_torchvision(name: str) -> Path:
    return _fetch_url(_torchvision_weights(name).url, name)


def _fetch_url(url: str, name: str) -> Path:
    """A file of torch's hub cache (``$TORCH_HOME/hub/checkpoints/``), downloaded there when missing."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if path.is_file():
        return path
    if offline():
        raise _download_failed(f"{name} ({url})", path, "CIFARLAB_OFFLINE is set")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from torch.hub import HASH_REGEX, download_url_to_file

        match = HASH_REGEX.search(path.name)  # torchvision's file names carry their sha256 prefix
        download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None, progress=True)
    except Exception as e:  # URLError, OSError, RuntimeError (hash mismatch) ...
        raise _download_failed(f"{name} ({url})", path, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}") \
            from None
    return path


def _fetch_timm(name: str) -> Path:
    c = pretrained_cfg(name)
    if not c.get("hf_hub_id"):  # older timm weights published only as a URL: torch's hub cache, as timm would
        return _fetch_url(str(c["url"]), name)
    hit, place = timm_cache_file(name)
    if hit is not None:
        return hit
    repo = str(pretrained_cfg(name)["hf_hub_id"])
    if offline() or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise _download_failed(f"{name} (huggingface.co/{repo})", place, "offline")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo.split("@")[0], "model.safetensors", cache_dir=str(hf_cache_dir())))
    except Exception as e:
        raise _download_failed(f"{name} (huggingface.co/{repo})", place,
                               f"{type(e).__name__}: {str(e).splitlines()[0][:120]}") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch file (``weights_only=True``); containers are unwrapped
    (``state_dict``, ``model``, cifarlab's ``last.pt``) and DDP / compile prefixes stripped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"model.weights: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
    else:
        from ..train.checkpoint import load_checkpoint  # weights_only=True, a refusal names the unsafe object

        sd = load_checkpoint(path)
        for key in ("state_dict", "model", "module"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path} is not a state dict: {k!r} holds a {type(v).__name__}")
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def load_matching(model: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> list[str]:
    """Load ``tensors`` into ``model``; the head's tensors of another shape (another class count) are skipped
    and keep their initialization. Returns the skipped keys; any other mismatch raises a CheckpointError."""
    own = model.state_dict()
    head = classifier_name(model)
    in_head = lambda k: k == head or k.startswith(head + ".")  # noqa: E731
    skipped, bad = [], []
    for k, v in tensors.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            (skipped if in_head(k) else bad).append(k)
    if bad:
        k = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"{what} does not fit this model: {k} is {tuple(tensors[k].shape)} in the file, "
                              f"{tuple(own[k].shape)} in the model{more}; is it another architecture or "
                              f"configuration (stem, width, input size)?")
    unexpected = [k for k in tensors if k not in own]
    missing = [k for k in own if k not in tensors and not in_head(k) and not k.endswith("num_batches_tracked")]
    if unexpected or missing:
        parts = ([f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"] if unexpected
                 else []) + ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing
                             else [])
        raise CheckpointError(f"{what} does not fit this model ({'; '.join(parts)}); is it another architecture?")
    model.load_state_dict({k: v for k, v in tensors.items() if k not in skipped}, strict=False)
    return skipped


def load_initial_weights(model: nn.Module, cfg: RunConfig, num_classes: int) -> str | None:
    """Load the run's starting weights into the freshly built ``model``; returns a line for the log (None when
    the model starts from its random initialization)."""
    m = cfg.model
    if m.weights:
        skipped = load_matching(model, read_state_dict(m.weights), f"model.weights={m.weights}")
        return _line(f"weights from {m.weights}", skipped, num_classes)
    if not m.pretrained:
        return None
    if is_timm(m.name):
        return _load_timm(model, cfg, num_classes)
    path = _fetch_torchvision(m.name)
    from ..train.checkpoint import load_checkpoint

    skipped = load_matching(model, load_checkpoint(path), f"the pretrained weights {path}")
    return _line(f"{pretrained_spec(m.name).source} ({path})", skipped, num_classes)


def _load_timm(model: nn.Module, cfg: RunConfig, num_classes: int) -> str:
    """timm builds the pretrained model from the cached file (its filters and head handling apply), then its
    tensors are copied into ``model``, which carries cifarlab's input resizing."""

    timm = require_timm()
    path = _fetch_timm(cfg.model.name)
    kwargs = model_kwargs(cfg.model.name, cfg.model.params, input_size(cfg))
    try:
        src = timm.create_model(architecture(cfg.model.name), pretrained=True, num_classes=num_classes,
                                pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except Exception as e:  # a damaged or foreign file: timm raises RuntimeError, KeyError, SafetensorError ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"the pretrained weights {path} do not load into {cfg.model.name}: {msg[:300]}") from None
    model.load_state_dict(src.state_dict())
    return f"start: {pretrained_spec(cfg.model.name).source} ({path}), head for {num_classes} classes"


def _line(source: str, skipped: list[str], num_classes: int) -> str:
    head = f"; head {', '.join(skipped)} initialized for {num_classes} classes" if skipped else ""
    return f"start: {source}{head}"


def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """The configured model, randomly initialized, for inputs of the run's input size (models.pretrained)."""
    return create_for_input(cfg.model.name, num_classes, cfg.model.params, input_size(cfg), cfg.data.image_size)
