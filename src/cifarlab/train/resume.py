"""Resuming a run from whatever state a crash left its directory in.

A run directory moves through these states, and a SIGKILL can stop it in any of them:

1. absent, or empty (killed before ``fit`` created it, or between ``mkdir`` and the first file);
2. ``config.yaml`` (+ ``metrics.csv``, maybe ``best.safetensors``), no checkpoint yet: killed before the
   first checkpoint. ``--resume`` starts the run again from that config.yaml (one line says so);
3. ``last.pt`` (and, from the second checkpoint on, ``last.prev.pt``, the one it replaced): ``--resume``
   continues from ``last.pt``; if that file cannot be read (a damaged disk, a copy cut short) from
   ``last.prev.pt``; if neither can, from the start. A checkpoint that loads but holds code, or fits
   another model, is still an error: falling back would hide it.

Every write is atomic (temporary file, fsync, rename; see :func:`checkpoint.atomic_write`), so a kill
never tears a file; the temporary files it leaves (``.NAME.*.tmp``) are ignored and removed.

The resumed run is the interrupted one: ``--set`` may change only where and how it runs (device,
precision, threads, checkpoint interval ...) and may add epochs; anything else would make it another run,
and is refused (:func:`resume_config`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import RunConfig, load_config
from ..errors import CheckpointError, CifarlabError, ConfigError
from .checkpoint import RefusedCheckpoint, load_checkpoint, previous_path

CHECKPOINT = "last.pt"

# Keys --set may change on --resume: where and how the run executes, not what it computes (train.epochs:
# only upwards, see resume_config). data.path: the same data may have moved (another machine).
# data.skip_bad_images: a run that trained had no unreadable image, and one that stopped on it has no
# checkpoint to continue from (its resume starts over).
SAFE_ON_RESUME = ("train.epochs", "train.device", "train.precision", "train.num_threads", "train.compile",
                  "train.channels_last", "train.checkpoint_every_steps", "train.nan_policy", "train.log_every",
                  "train.eval_batch_size", "train.tta", "data.path", "data.skip_bad_images")


def is_temp_file(p: Path) -> bool:
    """What a write cut short by a kill leaves beside the file it was to replace (never read)."""
    return p.name.startswith(".") and p.name.endswith(".tmp")


def run_files(run_dir: Path) -> list[Path]:
    """The entries of a run directory, temporary files of killed writes left out."""
    try:
        return sorted(p for p in Path(run_dir).iterdir() if not is_temp_file(p))
    except OSError:
        return []


def has_checkpoint(run_dir: Path) -> bool:
    last = Path(run_dir) / CHECKPOINT
    return last.is_file() or previous_path(last).is_file()


def find_checkpoint(run_dir: str | Path) -> tuple[dict[str, Any] | None, Path | None, str | None]:
    """(state, path, note): the newest checkpoint of ``run_dir`` that loads, else (None, None, note).

    ``note`` is the one line to print when the run does not simply continue from ``last.pt``. A checkpoint
    refused as unsafe raises: another file holding code must not be skipped over silently.
    """
    run_dir = Path(run_dir)
    last = run_dir / CHECKPOINT
    problems = []
    for path in (last, previous_path(last)):
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path)
        except RefusedCheckpoint:
            raise
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if path == last:
            return state, path, None
        why = f"{last} is missing" if not problems else problems[0]
        return state, path, f"{why}; resuming from the previous checkpoint, {path.name}"
    if problems:
        return None, None, (f"no usable checkpoint in {run_dir} ({'; '.join(problems)}): "
                            f"starting the run again from its config.yaml")
    return None, None, f"no checkpoint in {run_dir} yet (stopped before the first one): starting the run from its config.yaml"


def set_aside_unreadable(run_dir: Path, used: Path | None) -> None:
    """When the resume passed over an unreadable last.pt, rename it to last.pt.damaged: left in place, the next
    checkpoint would rotate it into last.prev.pt and the good previous checkpoint would be gone."""
    last = Path(run_dir) / CHECKPOINT
    if used is not None and used != last and last.is_file():
        try:
            os.replace(last, last.with_name(CHECKPOINT + ".damaged"))
        except OSError:
            pass  # the run goes on; only the reserve is weaker


def existing_run_message(run_dir: Path) -> str:
    """Why ``train --name`` refuses an existing, non-empty run directory, and the ways forward (one line)."""
    if has_checkpoint(run_dir) or not (run_dir / "config.yaml").is_file():
        return (f"run directory {run_dir} already exists; pass --resume {run_dir} to continue it or --overwrite "
                f"to replace it")
    return (f"run directory {run_dir} holds a run stopped before its first checkpoint; pass --resume {run_dir} "
            f"to start it again from its config.yaml, or --overwrite to replace it")


def _flat(cfg: RunConfig) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}


def resume_config(run_dir: str | Path, overrides: list[str]) -> tuple[RunConfig, list[str]]:
    """The config to resume ``run_dir`` with: its config.yaml and the overrides that keep it the same run.

    Returns (config, notes), a note per key that changes. Raises a ConfigError naming every key that may
    not change on resume, and for fewer epochs.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        if run_dir.is_dir() and not run_files(run_dir):
            raise CifarlabError(f"--resume {run_dir}: not a run directory (no config.yaml); if a run was stopped "
                                f"before it wrote its first file, start it again with the command that created it "
                                f"(its empty directory is no obstacle)")
        raise CifarlabError(f"--resume {run_dir}: not a run directory (no config.yaml)")
    saved = load_config(run_dir / "config.yaml")
    cfg = load_config(run_dir / "config.yaml", overrides)
    before, after = _flat(saved), _flat(cfg)
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    notes = []
    if "train.epochs" in changed:
        old, new = saved.train.epochs, cfg.train.epochs
        if new < old:
            raise ConfigError(f"--resume: train.epochs={new} is fewer than the run's {old}; to stop early, stop "
                              f"it: best.safetensors already holds the best weights so far")
        if cfg.optim.schedule == "onecycle":
            raise ConfigError(f"--resume: more epochs ({old} -> {new}) cannot extend optim.schedule=onecycle, whose "
                              f"length is fixed when the run starts; start a new run with --epochs {new}")
        notes.append(f"train.epochs {old} -> {new}: the run goes on past its planned end; from here its schedule "
                     f"spans {new} epochs, so it is not the run a {new}-epoch start would give")
    refused = [k for k in changed if k not in SAFE_ON_RESUME]
    if refused:
        what = ", ".join(f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in refused)
        raise ConfigError(f"--resume continues the run as it was configured and cannot change {what}; start a new "
                          f"run for that (--config {run_dir / 'config.yaml'} --set ... --name NEW). On resume "
                          f"--set may change only: {', '.join(SAFE_ON_RESUME)} (epochs: more, not fewer)")
    notes += [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed if k != "train.epochs"]
    return cfg, notes
