"""Exact and near duplicates, within and across splits; pairs across train and validation / test are leaks.

Exact: images whose decoded pixels hash alike (BLAKE2b of the uint8 array). Near: candidate pairs are each
image's nearest neighbours (:func:`cifarlab.audit.neighbors.knn`) in the fold models' penultimate features
and in small grey thumbnails (8 x 8, each standardized to zero mean and unit norm, so that a brightness or
contrast change leaves it alike); a candidate's distance is the mean of its two cosine distances, so that
both the model (crops, colour shifts) and the pixels (re-encodings, the same photo) must find it close
(the approach of Barz and Denzler 2020, "Do we train on test data?", who compared in a CNN's feature space).
A near pair must also pass a ratio test (Lowe 2004): its distance below ``ratio`` times the distance of either
image's next nearest candidate, so that in a data set of look-alike images (one product photographed many
times, generated data) only pairs much closer than their neighbourhood count.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .neighbors import knn, normalize

THUMB = 8  # pixels per side of the grey thumbnails


@dataclass
class Pair:
    a: int  # indices into the images given (all splits stacked)
    b: int
    distance: float
    kind: str  # leak-exact, leak-near, exact, near


def pixel_hashes(chunks) -> list[bytes]:
    """One digest per image, from uint8 (N, C, H, W) chunks."""
    out = []
    for x in chunks:
        arr = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x)
        out += [hashlib.blake2b(img.tobytes(), digest_size=16).digest() for img in arr]
    return out


def thumbnails(chunks) -> torch.Tensor:
    """(N, THUMB * THUMB) grey thumbnails, zero mean and unit norm each (a flat image is all zeros)."""
    out = []
    for x in chunks:
        g = x.float().mean(1, keepdim=True)  # (n, 1, H, W) grey
        t = F.adaptive_avg_pool2d(g, THUMB).flatten(1)
        t = t - t.mean(1, keepdim=True)
        out.append(t)
    return normalize(torch.cat(out)) if out else torch.zeros(0, THUMB * THUMB)


def find_duplicates(hashes: list[bytes], features: torch.Tensor, thumbs: torch.Tensor, splits: np.ndarray, *,
                    k: int = 5, threshold: float = 0.1, ratio: float = 0.5, block: int = 4096) -> list[Pair]:
    """Duplicate pairs (a < b), leaks first, then by distance.

    ``features`` and ``thumbs`` are unit rows (N, d); ``splits`` (N,) the split of each image ("train", "val",
    "test"). A near pair needs a combined distance below ``threshold``."""
    splits = np.asarray(splits)
    groups: dict[bytes, list[int]] = {}
    for i, h in enumerate(hashes):
        groups.setdefault(h, []).append(i)
    exact = {(g[0], j) for g in groups.values() if len(g) > 1 for j in g[1:]}
    cand = set()
    for vecs in (features, thumbs):
        _, idx = knn(vecs, k, block=block)
        for i, row in enumerate(idx):
            cand.update((min(i, j), max(i, j)) for j in row.tolist() if j >= 0)
    cand -= exact
    exact_all = {(min(a, b), max(a, b)) for a, b in exact}
    cand -= exact_all
    pairs = [Pair(a, b, 0.0, "exact") for a, b in sorted(exact_all)]
    if cand:
        c = np.array(sorted(cand))
        a, b = torch.from_numpy(c[:, 0]), torch.from_numpy(c[:, 1])
        d = ((1 - (features[a] * features[b]).sum(1)) + (1 - (thumbs[a] * thumbs[b]).sum(1))) / 2
        # the two nearest candidates of each image (distance, other), for the ratio test
        near: dict[int, list[tuple[float, int]]] = {}
        for (i, j), dist in zip(c.tolist(), d.tolist()):
            for u, v in ((i, j), (j, i)):
                near.setdefault(u, []).append((dist, v))
                near[u] = sorted(near[u])[:2]

        def next_nearest(u: int, other: int) -> float:
            return next((dd for dd, v in near[u] if v != other), float("inf"))

        for (i, j), dist in zip(c.tolist(), d.tolist()):
            if dist < threshold and dist < ratio * min(next_nearest(i, j), next_nearest(j, i)):
                pairs.append(Pair(i, j, float(dist), "near"))
    for p in pairs:
        if (splits[p.a] == "train") != (splits[p.b] == "train"):
            p.kind = f"leak-{p.kind}"
    pairs.sort(key=lambda p: (not p.kind.startswith("leak"), p.distance))
    return pairs
