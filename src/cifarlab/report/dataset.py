"""``data_overview(cfg)``: the data set at a glance, before any training.

Images per class in each split, the normalization statistics, the first
training images with their labels and, optionally, the same images after the
configured augmentation (several draws each), drawn by the very
:class:`~cifarlab.data.augment.BatchAugment` that training uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..data.augment import BatchAugment
from ..data.dataset import SplitPlan, channel_stats, load_raw, plan_splits
from ..data.loader import step_seed
from ..errors import DataError
from ..io import atomic_write_text
from . import figures
from . import html as H
from .runs import json_safe, warn


def augment_draws(x: torch.Tensor, cfg: RunConfig, mean: list[float], std: list[float], draws: int) -> torch.Tensor:
    """(draws, N, 3, H, W) uint8: ``x`` (uint8) augmented as a training batch is, once per draw.

    Draw d uses the generator of epoch d, step 0, as :class:`~cifarlab.data.loader.DeviceBatches`
    does, so cutout (applied after normalization) fills with the mean colour exactly as in training.
    """
    aug = BatchAugment(cfg.data, len(x), cfg.train.seed)
    idx = torch.arange(len(x))
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    out = []
    for d in range(draws):
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, d, 0))
        xb = aug(x.float() / 255.0, idx, d, gen)
        xb = aug.post_normalize((xb - m) / s, gen) * s + m
        out.append((xb.clamp(0, 1) * 255.0).round().to(torch.uint8))
    return torch.stack(out)


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` images of each class, interleaved (row r = the r-th of each class).

    Image folders list one class after another, so the plain first images would all share a class.
    """
    classes = np.unique(labels)
    firsts = [np.flatnonzero(labels == c)[:per_class] for c in classes]
    return np.array([f[r] for r in range(per_class) for f in firsts if r < len(f)], dtype=np.int64)


def describe_augmentation(cfg: RunConfig) -> str:
    d = cfg.data
    parts = []
    if d.augment_p > 0:
        parts.append(f"with p={d.augment_p:g}: {'flip, ' if d.augment_flip else ''}rotation ±{d.rotation:g}°, "
                     f"crop scale {d.crop_scale}, ratio {[round(r, 3) for r in d.crop_ratio]}")
    if d.flip != "none":
        parts.append(f"{d.flip} flip")
    if d.translate:
        parts.append(f"translate ±{d.translate}px")
    if d.cutout:
        parts.append(f"cutout {d.cutout}px")
    return "; ".join(parts) or "none"


def data_overview(cfg: RunConfig, out: str | Path = "data-overview", *, augment: bool = False, n_images: int = 40,
                  n_augmented: int = 8, draws: int = 6) -> dict[str, Any]:
    """Write ``out/`` (PNGs, ``data.json``, ``data.html``); return the numbers of ``data.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = load_raw(cfg.data)
    classes = list(raw.classes)
    warnings: list[str] = []
    # The split as training makes it (cifarlab.data.load_data); a config asking for more images than there
    # are still gets an overview, of the whole training set.
    try:
        plan = plan_splits(raw, cfg.data)
    except DataError as e:
        warnings.append(f"{e}; showing the whole training set as 'train' and no validation split")
        every = np.arange(len(raw.train_y))
        test = (raw.test_x, np.arange(len(raw.test_y)), raw.test_y) if raw.test_x is not None else (
            raw.train_x, every[:0], raw.train_y[:0])
        plan = SplitPlan((raw.train_x, every, raw.train_y), (raw.train_x, every[:0], raw.train_y[:0]), test, [])
    train_x = torch.from_numpy(np.ascontiguousarray(plan.train[0][plan.train[1]])).permute(0, 3, 1, 2).contiguous()
    train_y = np.asarray(plan.train[2])
    mean, std = channel_stats(train_x)
    C = len(classes)
    counts = {"train": np.bincount(train_y, minlength=C).tolist(),
              "validation": np.bincount(plan.val[2], minlength=C).tolist(),
              "test": np.bincount(plan.test[2], minlength=C).tolist()}
    if not len(plan.val[2]):
        del counts["validation"]
    given = [s for s in ("validation", "test") if s in counts and ("val" if s == "validation" else s) not in plan.carved]
    carved = [("validation" if s == "val" else s) for s in plan.carved]
    split_note = (f"{' and '.join(carved).capitalize()} carved from the source's training images (seeded, stratified, "
                  f"data.seed={cfg.data.seed}); " if carved else "") + (
                  f"{' and '.join(given)} as the source gives {'them' if len(given) > 1 else 'it'}." if given else "")
    if C > 1 and min(counts["train"]) * 3 < max(counts["train"]):
        warnings.append(f"the classes are imbalanced (training images per class from {min(counts['train'])} to "
                        f"{max(counts['train'])}): read balanced accuracy and macro F1 beside accuracy, and consider "
                        f"--set train.class_weights=balanced")

    figs = [("Images per class", figures.class_counts(counts, classes, f"Images per class and split ({raw.source})",
                                                      out / "class_counts.png"),
             split_note)]
    first = first_per_class(train_y, -(-n_images // C))
    shown = first[:n_images]
    figs.append(("First training images", figures.image_grid(
        train_x[shown].numpy(), [classes[int(c)] for c in train_y[shown]],
        f"The first training images of each class ({len(shown)} images)", out / "samples.png", ncols=C if C <= 12 else 8),
        "The first images of each class in the training split, each with its label."))
    aug_text = describe_augmentation(cfg)
    if augment:
        sel = torch.from_numpy(first[:n_augmented])
        views = augment_draws(train_x[sel], cfg, mean, std, draws)  # (draws, k, 3, H, W)
        grid = torch.cat([train_x[sel][:, None], views.transpose(0, 1)], dim=1).reshape(-1, *train_x.shape[1:])
        if aug_text == "none":
            warnings.append("no augmentation is configured (data.augment_p=0, no flip/translate/cutout): every draw "
                            "equals the original; try --config configs/cnn.yaml or --set data.augment_p=1")
        if cfg.data.mixup or cfg.data.cutmix or cfg.data.trivial_augment:
            warnings.append("mixup, cutmix and TrivialAugment are not drawn here")
        figs.append(("Augmentation", figures.image_grid(
            grid.numpy(), [""] * len(grid), f"Training augmentation, {draws} draws per image: {aug_text}",
            out / "augment.png", ncols=draws + 1, row_labels=[classes[int(c)] for c in train_y[sel.numpy()]],
            col_labels=["original"] + [f"draw {i + 1}" for i in range(draws)]),
            "Each row: a training image, then independent draws of the configured augmentation (the draws of "
            "epochs 1, 2, ... of the training batch generator)."))

    info = {"source": raw.source, "layout": raw.info.get("layout", ""), "sizes_found": raw.info.get("sizes", {}),
            "carved": plan.carved, "classes": classes, "image_size": int(train_x.shape[-1]),
            "counts": counts, "totals": {k: int(sum(v)) for k, v in counts.items()},
            "mean": mean, "std": std, "skipped_images": raw.skipped, "augmentation": aug_text,
            "config": cfg.to_dict()["data"], "figures": [p.name for _, p, _ in figs], "warnings": warnings,
            "edits": plan.edits}
    atomic_write_text(out / "data.json", json.dumps(json_safe(info), indent=2))
    for w in warnings:
        warn(w)

    rows = [[c] + [counts[s][i] for s in counts] for i, c in enumerate(classes)]
    rows.append(["total"] + [sum(v) for v in counts.values()])
    stats = H.table(["", "red", "green", "blue"], [["mean", *mean], ["std", *std]])
    sections = [("Images per class", H.table(["class", *counts], rows)),
                ("Normalization (training split, [0, 1] units)", stats)]
    if warnings:
        sections.insert(0, ("Warnings", "".join(f'<p class="warn">{H.esc(w)}</p>' for w in warnings)))
    sections += [(h, H.figure(p, h, cap)) for h, p, cap in figs]
    page = H.page(f"Data set: {raw.source}", f"{len(classes)} classes · {info['image_size']}x{info['image_size']} "
                  f"pixels · augmentation: {aug_text}", sections)
    atomic_write_text(out / "data.html", page)
    info["html"] = str(out / "data.html")
    return info
