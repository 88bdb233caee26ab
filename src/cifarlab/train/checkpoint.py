"""Files of a run: atomic writes, safetensors weights with a JSON sidecar,
and full training checkpoints loaded with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from ..errors import CheckpointError, CifarlabError
from ..io import atomic_write, atomic_write_text, previous_path

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile / AveragedModel wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def state_dict_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in unwrap(model).state_dict().items()}


def save_weights(path: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """``NAME.safetensors`` plus ``NAME.json`` (model name, hyperparameters, classes, normalization)."""
    path = Path(path)
    # Serialized in memory, then written like every other run file: same temp + fsync + rename, same umask,
    # same clear error on a full disk.
    blob = safetensors_save(state_dict_cpu(model), metadata={"format": "pt", "model": str(meta.get("model", ""))})
    atomic_write(path, lambda f: f.write(blob))
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the sidecar {sidecar}: {e}") from None
    return tensors, meta


def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    try:
        unwrap(model).load_state_dict(tensors)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{what} does not fit this model ({first[0] if first else e}); "
                              f"was it saved from another model or class count?") from None


class RefusedCheckpoint(CheckpointError):
    """A checkpoint that holds objects which could run code: refused, never skipped over."""


def save_checkpoint(path: str | Path, state: dict[str, Any], keep_previous: bool = True) -> None:
    """Write a checkpoint atomically; the one it replaces stays as ``last.prev.pt`` (see previous_path), the
    fallback should ``last.pt`` ever be unreadable (a damaged disk, a copy cut short)."""
    atomic_write(path, lambda f: torch.save(state, f), keep_previous=previous_path(path) if keep_previous else None)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint without running pickled code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message suggests weights_only=False; name the refused object instead.
        hit = re.search(r"(?:unsupported |Unsupported global: )(GLOBAL [\w.]+)", str(e))
        damage = re.search(r"Unsupported operand \d+|invalid load key[^\n]*", str(e))
        if hit is None and damage is not None:  # bytes that are no pickle at all: a damaged file, not a refusal
            raise CheckpointError(f"cannot load {path} (damaged or not a checkpoint): {damage.group(0)}") from None
        what = hit.group(1) if hit else "objects other than tensors and plain containers"
        raise RefusedCheckpoint(f"refusing to load {path}: it holds {what}, which could run code; cifarlab loads "
                              f"only checkpoints it wrote") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError ... for damaged files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {path} (damaged or not a checkpoint): {msg[:300]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a cifarlab checkpoint (holds a {type(state).__name__}, not a dict)")
    return state
