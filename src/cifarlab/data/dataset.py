"""Resolve the source, plan the train / validation / test splits, compute normalization, hold tensors."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..config import DataConfig, RunConfig
from ..errors import ConfigError, DataError
from .registry import RawData
from .sources import find_source


@dataclass
class ImageData:
    """Splits as uint8 tensors (N, C, H, W) and int64 labels, plus class names and normalization.

    Models and the trainer take the input's shape from here (``channels``, ``image_size``, ``num_classes``)
    rather than assuming CIFAR-10's 3 x 32 x 32 and 10 classes."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: list[float]  # per channel, of the training split, in [0, 1] units
    std: list[float]
    source: str = ""
    skipped: int = 0
    info: dict = field(default_factory=dict)
    # per split, the name of each image: its file (relative to data.path) for folder and labels-file data,
    # ``split/index`` (the source's split) for archives; what data.exclude, data.relabel and the audit name
    paths: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Channels per image, from the data: 3 today, as every source converts to RGB (gray MNIST too)."""
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])


def resolve_source(path: str | None) -> tuple[str, Path | None]:
    """Return (kind, path) for a ``--data`` value: kind is 'named', 'archive', 'folder', 'labels' or 'download'."""
    src = find_source(DataConfig(path=path))
    return src.kind, src.path


def load_raw(cfg: DataConfig) -> RawData:
    """Decode (or load from the cache) the source ``cfg`` names, at ``cfg.image_size`` when set."""
    raw = find_source(cfg).load(cfg)
    size = raw.train_x.shape[1]
    if cfg.image_size is not None and (size != cfg.image_size or raw.train_x.shape[2] != cfg.image_size):
        raw = _resize(raw, cfg.image_size)
    return raw


def _resize(raw: RawData, size: int) -> RawData:
    import torch.nn.functional as F

    def r(x: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        out = np.empty((len(x), size, size, x.shape[3]), np.uint8)
        for i in range(0, len(x), 4096):  # in chunks: the source may be a memory map larger than memory
            t = torch.from_numpy(np.array(x[i:i + 4096])).permute(0, 3, 1, 2).float()  # a writable copy
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out[i:i + 4096] = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return out

    return dataclasses.replace(raw, train_x=r(raw.train_x), test_x=r(raw.test_x), val_x=r(raw.val_x))


def _stratified(idx: np.ndarray, labels: np.ndarray, n: int, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(rest, picked): ``n`` of ``idx`` drawn stratified by ``labels`` (one per index), seeded."""
    try:
        rest, picked = train_test_split(idx, test_size=n, stratify=labels, random_state=seed)
    except ValueError as e:  # a class with a single image cannot be stratified
        raise DataError(f"cannot carve a stratified {what} of {n} from {len(idx)} images ({e})") from None
    return rest, picked


def split_indices(labels: np.ndarray, train_size: int | None, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/validation split of the training set's indices.

    ``train_size`` is an upper bound (None: no bound): a smaller data set trains on all images not held out
    for validation.
    """
    n = len(labels)
    idx = np.arange(n)
    n_classes = len(np.unique(labels))
    if val_size > n - n_classes:
        raise DataError(f"data.val_size={val_size} leaves too few of the {n} training images for training")
    if val_size == 0:
        val = np.array([], np.int64)
        rest = idx
    else:
        if val_size < n_classes:
            raise DataError(f"data.val_size={val_size} must be 0 or at least the number of classes ({n_classes})")
        rest, val = _stratified(idx, labels, val_size, seed, "validation split")
    if train_size is not None and train_size < len(rest):
        if train_size < n_classes:
            raise DataError(f"data.train_size={train_size} must be at least the number of classes ({n_classes})")
        train, _ = train_test_split(rest, train_size=train_size, stratify=labels[rest], random_state=seed)
    else:
        train = rest
    return np.sort(train), np.sort(val)


@dataclass
class SplitPlan:
    """Which images each split takes: (array, indices into it, labels) per split."""

    train: tuple[np.ndarray, np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray, np.ndarray]
    carved: list[str]  # the splits cut from the source's training images (for the data overview)
    # the source split each planned split's indices point into ("train", "val" or "test")
    origin: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "val", "test": "test"})
    edits: dict = field(default_factory=dict)  # what data.exclude / data.relabel changed (see apply_edits)


def plan_splits(raw: RawData, cfg: DataConfig) -> SplitPlan:
    """Test: the source's own, else ``data.test_fraction`` of its images (stratified, ``data.seed``).
    Validation: the source's own, else ``data.val_size`` images or ``data.val_fraction`` of the rest.
    Train: the rest, at most ``data.train_size`` (a stratified subset)."""
    carved = []
    pool = np.arange(len(raw.train_y))
    if raw.test_x is None:
        n_test = max(int(round(cfg.test_fraction * len(pool))), len(raw.classes))
        pool, test_idx = _stratified(pool, raw.train_y, n_test, cfg.seed, f"test split (data.test_fraction="
                                                                          f"{cfg.test_fraction:g})")
        pool, test_idx = np.sort(pool), np.sort(test_idx)
        test = (raw.train_x, test_idx, raw.train_y[test_idx])
        carved.append("test")
    else:
        test = (raw.test_x, np.arange(len(raw.test_y)), np.asarray(raw.test_y))
    if raw.val_x is not None:
        val = (raw.val_x, np.arange(len(raw.val_y)), np.asarray(raw.val_y))
        tr, _ = split_indices(raw.train_y[pool], cfg.train_size, 0, cfg.seed)
    else:
        n_val = cfg.val_size
        if n_val is None:  # a fraction; at least one image per class, as a stratified split needs
            n_val = max(int(round(cfg.val_fraction * len(pool))), len(raw.classes)) if cfg.val_fraction else 0
        tr, va = split_indices(raw.train_y[pool], cfg.train_size, n_val, cfg.seed)
        val = (raw.train_x, pool[va], raw.train_y[pool[va]])
        carved.append("val")
    train = (raw.train_x, pool[tr], raw.train_y[pool[tr]])
    origin = {"train": "train", "val": "train" if "val" in carved else "val",
              "test": "train" if "test" in carved else "test"}
    return apply_edits(SplitPlan(train, val, test, carved, origin), raw, cfg)


def source_paths(raw: RawData) -> dict[str, list[str] | None]:
    """Per source split, the name of each image (see :attr:`ImageData.paths`); None: ``split/index``."""
    files = raw.info.get("files") or {}
    return {s: (files.get(s) if len(files.get(s) or ()) == len(getattr(raw, f"{s}_y")) else None)
            for s in raw.splits()}


def image_name(names: dict[str, list[str] | None], split: str, i: int) -> str:
    return names[split][i] if names.get(split) is not None else f"{split}/{i}"


def _read_edit_file(path: str, key: str, columns: tuple[str, ...]) -> list[list[str]]:
    """Rows of a CSV with a header naming ``columns`` (other columns ignored), or, for ``data.exclude``, a
    text list (one path a line; blank lines and ``#`` comments skipped)."""
    import csv

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}: file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read {p}: {e}") from None
    rows = list(csv.reader(lines))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if all(c in header for c in columns):
        at = [header.index(c) for c in columns]
        return [[r[i].strip() for i in at] for r in rows[1:] if len(r) > max(at) and r[at[0]].strip()]
    if len(columns) == 1:
        return [[ln.strip()] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    raise ConfigError(f"{key}: {p} must be a CSV whose header names the columns {', '.join(columns)}")


def apply_edits(plan: SplitPlan, raw: RawData, cfg: DataConfig) -> SplitPlan:
    """``data.exclude`` drops the images it names from every split; ``data.relabel`` gives images new labels.

    Applied after the splits are planned, so the other images keep their split: a run on the cleaned data is
    tested on the same test images, less the excluded ones. A path the data set does not hold, or a class it
    does not have, is an error (a typo would otherwise clean nothing, silently).
    """
    exclude, relabel = getattr(cfg, "exclude", None), getattr(cfg, "relabel", None)
    if not exclude and not relabel:
        return plan
    names = source_paths(raw)
    index = {image_name(names, s, i): (s, i) for s in names for i in range(len(getattr(raw, f"{s}_y")))}
    root = raw.info.get("root")

    def find(key: str, path: str) -> tuple[str, int]:
        hit = index.get(path) or index.get(path.replace("\\", "/"))
        if hit is None and root and Path(path).is_absolute():
            try:
                hit = index.get(Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix())
            except ValueError:
                pass
        if hit is None:
            raise ConfigError(f"{key}: {path!r} names no image of {raw.source} (paths are relative to data.path, "
                              f"or split/index for archives)")
        return hit

    edits: dict = {}
    drop: dict[str, set[int]] = {}
    if exclude:
        for (path,) in _read_edit_file(exclude, "data.exclude", ("path",)):
            s, i = find("data.exclude", path)
            drop.setdefault(s, set()).add(i)
        edits["exclude"] = {"file": str(exclude), "images": sum(len(v) for v in drop.values())}
    new: dict[str, dict[int, int]] = {}
    if relabel:
        classes = {c: k for k, c in enumerate(raw.classes)}
        for path, label in _read_edit_file(relabel, "data.relabel", ("path", "label")):
            if label not in classes:
                raise ConfigError(f"data.relabel: {path!r}: unknown class {label!r} (classes: "
                                  f"{', '.join(raw.classes)})")
            s, i = find("data.relabel", path)
            new.setdefault(s, {})[i] = classes[label]
        edits["relabel"] = {"file": str(relabel), "images": sum(len(v) for v in new.values())}

    def edit(part: tuple[np.ndarray, np.ndarray, np.ndarray], split: str):
        x, idx, y = part
        s = plan.origin[split]
        y = np.array(y, np.int64)
        for k, i in enumerate(idx.tolist()) if s in new else ():
            y[k] = new[s].get(i, y[k])
        keep = ~np.isin(idx, np.fromiter(drop.get(s, ()), np.int64))
        return x, idx[keep], y[keep]

    return SplitPlan(edit(plan.train, "train"), edit(plan.val, "val"), edit(plan.test, "test"), plan.carved,
                     plan.origin, edits)


def channel_stats(x) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std in [0, 1] units from a 256-bin histogram of uint8 images (N, C, H, W):
    a tensor, or :class:`~cifarlab.data.streaming.HostImages` read in chunks."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    chunks = x.chunks() if hasattr(x, "chunks") else [x]
    hists = None
    for chunk in chunks:
        h = torch.stack([torch.bincount(chunk[:, c].reshape(-1).to(torch.int64), minlength=256)
                         for c in range(chunk.shape[1])]).double()
        hists = h if hists is None else hists + h
    mean, std = [], []
    for hist in hists:
        m = (hist * values).sum() / hist.sum()
        var = (hist * (values - m) ** 2).sum() / hist.sum()
        mean.append(m.item())
        std.append(max(var.sqrt().item(), 1e-6))
    return mean, std


def _take(part: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images as one (N, C, H, W) uint8 tensor, gathered in chunks (the source may be a memory map)."""
    x, idx, y = part
    out = torch.empty((len(idx), x.shape[3], x.shape[1], x.shape[2]), dtype=torch.uint8)
    for i in range(0, len(idx), 4096):
        chunk = np.ascontiguousarray(x[idx[i:i + 4096]])  # a copy: writable, owned
        out[i:i + len(chunk)] = torch.from_numpy(chunk).permute(0, 3, 1, 2)  # NHWC -> NCHW
    return out, torch.from_numpy(np.array(y, np.int64))


def load_data(cfg: DataConfig, device: torch.device | str | None = None) -> ImageData:
    """Load (from cache when possible), split and normalize a data set as described by ``cfg``.

    Splits whose images together exceed the memory budget of ``device`` (``data.device_memory``, else half of
    its free memory) stay in the decode cache's memory map as :class:`~cifarlab.data.streaming.HostImages`,
    read batch by batch; otherwise they are gathered into uint8 tensors.
    """
    from .streaming import HostImages, memory_budget

    raw = load_raw(cfg)
    plan = plan_splits(raw, cfg)
    parts = (plan.train, plan.val, plan.test)
    nbytes = sum(len(idx) * int(np.prod(x.shape[1:])) for x, idx, _ in parts)
    stream = nbytes > memory_budget(device, cfg.device_memory)
    if stream:
        (train_x, val_x, test_x) = (HostImages(x, idx) for x, idx, _ in parts)
        (train_y, val_y, test_y) = (torch.from_numpy(np.array(y, np.int64)) for _, _, y in parts)
    else:
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = (_take(p) for p in parts)
    # Statistics of the training split only, so validation and test never leak into preprocessing.
    mean, std = channel_stats(train_x)
    names = source_paths(raw)
    paths = {split: [image_name(names, plan.origin[split], i) for i in part[1].tolist()]
             for split, part in zip(("train", "val", "test"), parts)}
    info = {k: v for k, v in raw.info.items() if k != "files"}
    return ImageData(train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y, test_x=test_x, test_y=test_y,
                     classes=list(raw.classes), mean=mean, std=std, source=raw.source, skipped=raw.skipped,
                     info={**info, "carved": plan.carved, "streaming": stream, "bytes": nbytes, **plan.edits},
                     paths=paths)


def apply_data_defaults(cfg: RunConfig, data: ImageData) -> RunConfig:
    """Fill what the config left to the data (``data.image_size``) and validate again with it.

    A model built for one size (a builder taking ``image_size``) refuses a data set of mixed sizes unless
    ``data.image_size`` says which size to resize to: there is no size that is right for it.
    """
    if cfg.data.image_size is None:
        from ..models import model_defaults

        if data.info.get("mixed_sizes") and "image_size" in model_defaults(cfg.model.name):
            sizes = ", ".join(list(data.info.get("sizes", {}))[:4])
            raise ConfigError(f"the images have mixed sizes ({sizes}, ...) and {cfg.model.name} is built for one "
                              f"size: set data.image_size (e.g. --set data.image_size={data.image_size})")
        cfg.data.image_size = data.image_size
        cfg.validate()
    return cfg
