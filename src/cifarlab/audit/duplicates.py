"""Exact and near duplicates, within and across splits; pairs across train and validation / test are leaks.

Exact: images whose decoded pixels hash alike (BLAKE2b of the uint8 array). Near: candidate pairs are each
image's nearest neighbours (:func:`cifarlab.audit.neighbors.search`) in three spaces: the fold models'
penultimate features; small grey thumbnails (8 x 8, each standardized to zero mean and unit norm, so that a
brightness or contrast change leaves it alike); and the magnitudes of the grey image's lowest spatial
frequencies (:func:`spectra`: a shift moves only the phase, so a shifted or slightly cropped copy stays close
there when a weak model's features and the thumbnails do not). A candidate's distance is the mean of its
feature cosine distance and a shift-tolerant pixel distance (:func:`shift_distance`: the smallest cosine
distance of the two blurred 16 x 16 grey thumbnails, each standardized over their overlap, over shifts of up
to 2 thumbnail pixels, i.e. 1/8 of the image side), so that both the model (crops, colour shifts) and the
pixels (re-encodings, shifts, the same photo) must find it close (the approach of Barz and Denzler 2020,
"Do we train on test data?", who compared in a CNN's feature space).
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

from .neighbors import normalize, search

THUMB = 8  # pixels per side of the grey thumbnails of the candidate search
GREY = 16  # pixels per side of the blurred grey thumbnails of the shift-tolerant distance
MAX_SHIFT = 2  # thumbnail pixels each way: 1/8 of the image side (4 pixels of a 32 px image)
SPECTRUM = 6  # the lowest frequencies kept per axis (both signs of the vertical one)


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


def grey_thumbnails(chunks) -> torch.Tensor:
    """(N, GREY, GREY) grey thumbnails (box-blurred by the pooling), for :func:`shift_distance`."""
    out = [F.adaptive_avg_pool2d(x.float().mean(1, keepdim=True), GREY)[:, 0] for x in chunks]
    return torch.cat(out) if out else torch.zeros(0, GREY, GREY)


def spectra(chunks) -> torch.Tensor:
    """(N, d) unit rows: log magnitudes of the grey image's lowest 2-D frequencies (at 32 x 32, DC left out,
    standardized), nearly unchanged by a shift or a small crop (a circular shift changes only the phase)."""
    out = []
    for x in chunks:
        g = F.adaptive_avg_pool2d(x.float().mean(1, keepdim=True), 32)[:, 0]
        m = torch.fft.rfft2(g - g.mean((1, 2), keepdim=True)).abs()  # (n, 32, 17)
        low = torch.cat([m[:, :SPECTRUM, :SPECTRUM], m[:, -SPECTRUM + 1:, :SPECTRUM]], 1).flatten(1)
        d = torch.log1p(low)
        out.append(d - d.mean(1, keepdim=True))
    return normalize(torch.cat(out)) if out else torch.zeros(0, (2 * SPECTRUM - 1) * SPECTRUM)


def shift_distance(grey: torch.Tensor, a: torch.Tensor, b: torch.Tensor, max_shift: int = MAX_SHIFT,
                   chunk: int = 65536) -> torch.Tensor:
    """(P,) for pairs (a[p], b[p]) of ``grey`` thumbnails: the smallest cosine distance, over shifts of up to
    ``max_shift`` pixels each way, of the two thumbnails' overlap, each standardized there (zero mean), so that
    a shifted, cropped, brightened or re-encoded copy is close. Pairs in chunks: O(chunk x GREY^2) memory."""
    out = torch.empty(len(a))
    S = grey.shape[-1]
    for c in range(0, len(a), chunk):
        A, B = grey[a[c:c + chunk]], grey[b[c:c + chunk]]
        best = torch.full((len(A),), 2.0)
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                h, w = S - abs(dy), S - abs(dx)
                u = A[:, max(dy, 0):max(dy, 0) + h, max(dx, 0):max(dx, 0) + w].flatten(1)
                v = B[:, max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w].flatten(1)
                u = u - u.mean(1, keepdim=True)
                v = v - v.mean(1, keepdim=True)
                d = 1 - (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1)).clamp_min(1e-6)
                best = torch.minimum(best, d)
        out[c:c + chunk] = best
    return out


def find_duplicates(hashes: list[bytes], features: torch.Tensor, thumbs: torch.Tensor, splits: np.ndarray, *,
                    grey: torch.Tensor | None = None, spectra: torch.Tensor | None = None, k: int = 5,
                    threshold: float = 0.1, ratio: float = 0.5, block: int = 4096) -> list[Pair]:
    """Duplicate pairs (a < b), leaks first, then by distance.

    ``features``, ``thumbs`` and ``spectra`` are unit rows (N, d) (:func:`thumbnails`, :func:`spectra`);
    ``grey`` the (N, GREY, GREY) thumbnails of the shift-tolerant distance (:func:`grey_thumbnails`; None: the
    cosine distance of ``thumbs`` instead); ``splits`` (N,) the split of each image ("train", "val", "test").
    A near pair needs a combined distance below ``threshold``."""
    splits = np.asarray(splits)
    groups: dict[bytes, list[int]] = {}
    for i, h in enumerate(hashes):
        groups.setdefault(h, []).append(i)
    exact = {(g[0], j) for g in groups.values() if len(g) > 1 for j in g[1:]}
    cand = set()
    for vecs in (features, thumbs, spectra):
        if vecs is None:
            continue
        _, idx = search(vecs, k, block=block)
        for i, row in enumerate(idx):
            cand.update((min(i, j), max(i, j)) for j in row.tolist() if j >= 0)
    cand -= exact
    exact_all = {(min(a, b), max(a, b)) for a, b in exact}
    cand -= exact_all
    pairs = [Pair(a, b, 0.0, "exact") for a, b in sorted(exact_all)]
    if cand:
        c = np.array(sorted(cand))
        a, b = torch.from_numpy(c[:, 0]), torch.from_numpy(c[:, 1])
        pixel = 1 - (thumbs[a] * thumbs[b]).sum(1) if grey is None else shift_distance(grey, a, b)
        d = ((1 - (features[a] * features[b]).sum(1)) + pixel) / 2
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
