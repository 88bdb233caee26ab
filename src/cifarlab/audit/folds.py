"""Out-of-sample probabilities by K-fold cross-fitting, each fold an ordinary run of the group runner.

Fold k trains on the training images outside fold k (its ``data.exclude`` is a file listing fold k's images,
plus any the user excluded), validates on the validation split as any run does, and then predicts fold k's
images, which it never saw, and the validation and test images, which get the folds' average. The folds live
in ``OUT/folds/fold-K/``: a rerun skips finished folds and resumes an interrupted one
(:class:`cifarlab.train.group.GroupRunner`); ``folds.json`` refuses a rerun with another config or K.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from ..config import RunConfig
from ..data.dataset import _read_edit_file
from ..errors import CifarlabError
from ..evaluation.inference import predict_logits
from ..evaluation.loader import load_model
from ..io import atomic_write, atomic_write_text
from ..models import classifier_name
from ..train.group import GroupRunner, Member, _comparable, seed_status
from .neighbors import normalize


def assign_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) the fold of each training image: stratified by class, seeded."""
    counts = np.bincount(labels)
    if folds < 2:
        raise CifarlabError(f"--folds must be >= 2, got {folds}")
    if counts[counts > 0].min() < folds:
        raise CifarlabError(f"too few images per class for {folds} folds: a class has {counts[counts > 0].min()} "
                            f"training images; use --folds {max(2, counts[counts > 0].min())} or more data")
    out = np.empty(len(labels), np.int64)
    for k, (_, held) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels)):
        out[held] = k
    return out


def fold_members(cfg: RunConfig, train_paths: list[str], fold_of: np.ndarray, folder: Path) -> list[Member]:
    """One member per fold; fold k's config excludes its images (and the user's ``data.exclude``)."""
    user = [p for (p,) in _read_edit_file(cfg.data.exclude, "data.exclude", ("path",))] if cfg.data.exclude else []
    members = []
    K = int(fold_of.max()) + 1
    for k in range(K):
        f = folder / f"fold-{k}.exclude.txt"
        text = "".join(f"{p}\n" for p in user + [train_paths[i] for i in np.flatnonzero(fold_of == k)])
        if not f.is_file() or f.read_text() != text:
            atomic_write_text(f, text)
        c = copy.deepcopy(cfg)
        c.data.exclude = str(f.resolve())
        members.append(Member(f"fold-{k}", c, f"fold {k + 1}/{K}"))
    return members


def fold_done(run_dir: Path) -> bool:
    """Finished by its own ``config.yaml``'s epochs: a fold trained to a time budget (``audit --time``) has the
    epochs its plan set there, not those of the config it started from."""
    import yaml

    try:
        epochs = int(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return False
    return seed_status(run_dir, epochs) == "done"


def check_folds(folder: Path, cfg: RunConfig, folds: int, overwrite: bool) -> None:
    info_file = folder / "folds.json"
    want = {"folds": folds, "config": _comparable(cfg.to_dict())}
    if info_file.is_file() and not overwrite:
        have = json.loads(info_file.read_text())
        if have != want:
            raise CifarlabError(f"{folder} holds folds of another config or --folds; rerun its own command, "
                                f"choose another -o, or pass --overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(info_file, json.dumps(want, indent=2))


@torch.inference_mode()
def logits_and_features(run_dir: Path, images: list) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The run's best weights on each of ``images`` (uint8 (N, C, H, W) tensors): logits (one view) and the
    input of the model's head (its penultimate features, by a forward hook)."""
    loaded = load_model(run_dir, as_trained=True)
    model, rt = loaded.model, loaded.runtime
    base = getattr(model, "_orig_mod", model)
    head = base.get_submodule(classifier_name(base))
    feats: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, args, out: feats.append(args[0].detach().flatten(1).float().cpu()))
    logits, features = [], []
    try:
        for x in images:
            if not len(x):  # an empty split (data.val_size=0)
                logits.append(np.zeros((0, int(loaded.meta["num_classes"])), np.float32))
                features.append(None)
                continue
            feats.clear()
            lg = predict_logits(model, x, loaded.normalize, rt, loaded.cfg.train.eval_batch_size, "none")
            logits.append(lg.cpu().numpy())
            features.append(torch.cat(feats).numpy())
    finally:
        hook.remove()
    return logits, features


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def fold_predictions(run_dir: Path, k: int, data, fold_of: np.ndarray) -> dict[str, np.ndarray]:
    """Fold ``k``'s logits on its held-out training images (``held``), the validation and test images, and for
    fold 0 every image's features (train, val, test stacked; unit rows in float16: half the bytes to keep
    and to share through a storage, and cosine distances to ~1e-3). Kept in ``run_dir/audit.npz``, reused while
    newer than the weights, or when the fold was trained on another machine (``remote.json``)."""
    cache, best = run_dir / "audit.npz", run_dir / "best.safetensors"
    if cache.is_file() and ((run_dir / "remote.json").is_file()
                            or (best.is_file() and cache.stat().st_mtime >= best.stat().st_mtime)):
        with np.load(cache) as z:
            return dict(z)
    held = np.flatnonzero(fold_of == k)
    images = [data.train_x[torch.from_numpy(held)], data.val_x, data.test_x]
    if k == 0:  # the first fold's model gives every image's features (one feature space for all)
        images.append(data.train_x)
    out_l, out_f = logits_and_features(run_dir, images)
    res = dict(zip(("held", "val", "test"), out_l[:3]))
    if k == 0:
        ft = np.concatenate([f for f in (out_f[3], out_f[1], out_f[2]) if f is not None])
        res["features"] = normalize(ft).numpy().astype(np.float16)
    atomic_write(cache, lambda f: np.savez(f, **res))
    return res


def fold_is_remote(run_dir: Path) -> bool:
    """Trained on another machine of a shared audit (``--storage``): its predictions were fetched."""
    return (run_dir / "remote.json").is_file() and (run_dir / "audit.npz").is_file()


def cross_fit(cfg: RunConfig, data, out: Path, folds: int, *, overwrite: bool = False, quiet: bool = False,
              log: Callable[[str], None] = print, fit_fn: Callable | None = None, storage: str | None = None,
              heartbeat: int = 10, poll: float = 5.0):
    """(probs per split, features of every image stacked train/val/test) from K folds trained under
    ``out/folds``. Each fold's predictions are kept in its ``audit.npz`` (:func:`fold_predictions`).

    ``storage`` (an SQLAlchemy URL): the folds are claimed through it by every process started with the same
    command, here and on other machines (:mod:`.claimed`); this returns once all are done, with the folds
    that others trained fetched from the storage."""
    folder = out / "folds"
    if storage and overwrite:
        raise CifarlabError("--overwrite with --storage: the folds in the storage are shared; use another storage "
                            "or drop --overwrite")
    check_folds(folder, cfg, folds, overwrite)
    fold_of = assign_folds(data.train_y.numpy(), folds, cfg.data.seed)
    members = fold_members(cfg, data.paths["train"], fold_of, folder)
    if storage:
        from .claimed import claimed_folds

        claimed_folds(cfg, data, members, folder, storage, done=fold_done,
                      predict=lambda k, run_dir: fold_predictions(run_dir, k, data, fold_of),
                      heartbeat=heartbeat, poll=poll, quiet=quiet, log=log, fit_fn=fit_fn)
    else:
        runner = GroupRunner(folder, quiet=quiet, fit_fn=fit_fn, log=lambda m: log(f"audit folds: {m}"))
        for k, m in enumerate(members):
            if fold_done(folder / m.name) or fold_is_remote(folder / m.name):
                log(f"audit folds: {m.label} already done")
            else:
                runner.run(m)
            fold_predictions(folder / m.name, k, data, fold_of)
    train_p = np.zeros((len(data.train_y), data.num_classes), np.float32)
    val_p = np.zeros((len(data.val_y), data.num_classes), np.float32)
    test_p = np.zeros((len(data.test_y), data.num_classes), np.float32)
    features = None
    for k, m in enumerate(members):
        z = fold_predictions(folder / m.name, k, data, fold_of)
        train_p[fold_of == k] = softmax(z["held"])
        val_p += softmax(z["val"]) / folds
        test_p += softmax(z["test"]) / folds
        if k == 0:
            features = z["features"].astype(np.float32)
    return {"train": train_p, "val": val_p, "test": test_p}, features
