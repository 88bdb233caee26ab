"""Odd images: near-constant, extremely dark or bright, and far from every class in feature space."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .neighbors import search

CONSTANT_STD = 0.02  # grey standard deviation in [0, 1] units below which an image is near-constant
DARK, BRIGHT = 0.08, 0.92  # mean grey level outside which the exposure is extreme
FAR_IQR = 3.0  # far: a k-NN distance above Q3 + FAR_IQR x IQR of all images' (Tukey's far-out fence)


@dataclass
class Outlier:
    index: int
    kind: str  # constant, dark, bright, far
    score: float  # the statistic that flagged it (grey std, mean grey level, k-NN distance)


def pixel_stats(chunks) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of each image's grey levels in [0, 1] units, from uint8 (N, C, H, W) chunks."""
    means, stds = [], []
    for x in chunks:
        g = x.float().mean(1).flatten(1) / 255.0
        means.append(g.mean(1))
        stds.append(g.std(1, correction=0))
    return torch.cat(means).numpy(), torch.cat(stds).numpy()


def knn_distance(features: torch.Tensor, reference: np.ndarray, k: int = 5, block: int = 4096) -> np.ndarray:
    """(N,) the mean cosine distance of each image to its ``k`` nearest ``reference`` images (indices into
    ``features``, the training images; an image is not its own neighbour)."""
    ref = torch.as_tensor(reference, dtype=torch.int64)
    d, idx = search(features[ref], k + 1, queries=features, exclude_self=False, block=block)
    self_hit = ref.numpy()[np.clip(idx, 0, None)] == np.arange(len(features))[:, None]
    d = np.where(self_hit | (idx < 0), np.nan, d)
    return np.nanmean(np.sort(d, 1)[:, :k], 1)  # nan (self) sorts last: k true neighbours


def find_outliers(mean: np.ndarray, std: np.ndarray, far: np.ndarray | None) -> list[Outlier]:
    """Every flagged image with its kind, strongest first within a kind."""
    out = [Outlier(i, "constant", float(std[i])) for i in np.flatnonzero(std < CONSTANT_STD)]
    rest = std >= CONSTANT_STD
    out += [Outlier(i, "dark", float(mean[i])) for i in np.flatnonzero(rest & (mean < DARK))]
    out += [Outlier(i, "bright", float(mean[i])) for i in np.flatnonzero(rest & (mean > BRIGHT))]
    if far is not None and len(far):
        q1, q3 = np.nanpercentile(far, [25, 75])
        fence = q3 + FAR_IQR * (q3 - q1)
        out += sorted((Outlier(i, "far", float(far[i])) for i in np.flatnonzero(far > fence)),
                      key=lambda o: -o.score)
    return out
