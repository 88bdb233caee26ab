"""Nearest neighbours by cosine distance in blocks, so that a million images fit in memory.

:func:`knn` is exact, by blocked matrix products: the queries in blocks of ``block`` rows against the data in
blocks of ``block`` rows, keeping the running top ``k`` of each query. Time O(N^2 d) multiply-adds (the
products are BLAS / cuBLAS matrix multiplications) plus a top-k over each block of similarities; memory O(N k)
for the result plus O(block^2) for one block of similarities and O(N d) for the (float32) vectors themselves:
at N = 1,000,000, d = 256, k = 5 and block = 4096, 1.0 GB of vectors, 40 MB of results and 64 MB per block.

Its time does not stay within reach at that size on a CPU: 1e12 pairs, ~60,000 blocks of 4096 x 4096, each a
product and a top-k of some 0.1-0.3 s on 2 cores: hours (N^2 scaling from 100,000 images). :func:`knn_buckets`
searches only near buckets instead (an inverted file, as FAISS's IVF): the data are clustered by spherical
k-means (``lists`` ~ sqrt(N) centroids, fitted on a sample), each vector goes to its nearest centroid, and each
query is compared exactly with the vectors of its ``probe`` nearest buckets.
Time O(N (L + probe N / L) d) = O(N^1.5 d) for L = sqrt(N); memory as above. It is approximate: a neighbour in
a bucket not probed is missed; a near duplicate sits next to its original, almost always in the same or a
neighbouring bucket (``benchmarks/audit.py neighbors`` plants pairs and reports their recall). :func:`search`
takes the exact search up to ``EXACT_MAX`` vectors and the buckets above. Lower precision (bf16 products) or
a random projection would cut only the products' share, not the top-k's, and by a constant: the buckets cut
the number of pairs. An index library (FAISS, HNSW) would be faster still; it would be a dependency for a
search that runs once per audit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

EXACT_MAX = 200_000  # vectors (data or queries) up to which search() is exact: 4e10 pairs, minutes on 2 cores


def normalize(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (float32); a zero row stays zero."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.inference_mode()
def knn(x: torch.Tensor, k: int, *, queries: torch.Tensor | None = None, exclude_self: bool = True,
        block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index), each (Q, k): the ``k`` rows of ``x`` nearest each query by cosine distance
    ``1 - <q, x>`` (rows unit length, :func:`normalize`), nearest first. ``queries`` None: ``x`` itself, each
    row's own match left out when ``exclude_self``. Fewer than ``k`` candidates: index -1, distance inf."""
    q = x if queries is None else queries
    same = queries is None and exclude_self
    N, Q = len(x), len(q)
    dist = np.full((Q, k), np.inf, np.float32)
    index = np.full((Q, k), -1, np.int64)
    for qs in range(0, Q, block):
        qb = q[qs:qs + block]
        best_s = torch.full((len(qb), k), -np.inf)
        best_i = torch.full((len(qb), k), -1, dtype=torch.int64)
        for xs in range(0, N, block):
            sim = qb @ x[xs:xs + block].T  # (b, b)
            if same and xs < qs + len(qb) and qs < xs + len(sim[0]):
                rows = torch.arange(len(qb))
                cols = rows + qs - xs
                ok = (cols >= 0) & (cols < sim.shape[1])
                sim[rows[ok], cols[ok]] = -np.inf
            top_s, top_i = sim.topk(min(k, sim.shape[1]), dim=1)
            cand_s = torch.cat([best_s, top_s], 1)
            cand_i = torch.cat([best_i, top_i + xs], 1)
            best_s, at = cand_s.topk(k, dim=1)
            best_i = cand_i.gather(1, at)
        found = torch.isfinite(best_s)
        dist[qs:qs + len(qb)] = torch.where(found, 1 - best_s, torch.full_like(best_s, np.inf)).numpy()
        index[qs:qs + len(qb)] = torch.where(found, best_i, torch.full_like(best_i, -1)).numpy()
    return dist, index


@torch.inference_mode()
def kmeans(x: torch.Tensor, lists: int, *, iters: int = 10, sample: int = 65536, seed: int = 0,
           block: int = 65536) -> torch.Tensor:
    """(lists, d) unit centroids of spherical k-means on a seeded sample of the unit rows ``x``."""
    g = torch.Generator().manual_seed(seed)
    s = x[torch.randperm(len(x), generator=g)[:min(len(x), max(sample, 32 * lists))]]
    cent = s[torch.randperm(len(s), generator=g)[:lists]].clone()
    for _ in range(iters):
        a = nearest_centroid(s, cent, block)
        sums = torch.zeros_like(cent).index_add_(0, a, s)
        moved = sums.norm(dim=1) > 0
        cent[moved] = normalize(sums[moved])  # an empty cluster keeps its centroid
    return cent


def nearest_centroid(x: torch.Tensor, cent: torch.Tensor, block: int = 65536) -> torch.Tensor:
    return torch.cat([(x[i:i + block] @ cent.T).argmax(1) for i in range(0, len(x), block)]) if len(x) else \
        torch.zeros(0, dtype=torch.int64)


@torch.inference_mode()
def knn_buckets(x: torch.Tensor, k: int, *, queries: torch.Tensor | None = None, exclude_self: bool = True,
                lists: int = 0, probe: int = 8, block: int = 4096, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`knn` (same arguments and result), each query compared only with the vectors of its ``probe``
    nearest of ``lists`` (0: about sqrt(N)) k-means buckets of ``x``: approximate, O(N^1.5 d) (module
    docstring). The scan goes bucket by bucket, each bucket's vectors against the queries that probe it."""
    q = x if queries is None else queries
    same = queries is None and exclude_self
    N, Q = len(x), len(q)
    lists = min(N, lists or max(1, round(math.sqrt(N))))
    probe = min(probe, lists)
    if not N or not Q:
        return np.full((Q, k), np.inf, np.float32), np.full((Q, k), -1, np.int64)
    cent = kmeans(x, lists, seed=seed)
    in_x = _members(nearest_centroid(x, cent), lists)
    probes = torch.cat([(q[i:i + 65536] @ cent.T).topk(probe, dim=1).indices for i in range(0, Q, 65536)])
    q_of = _members(probes.flatten(), lists, torch.arange(Q).repeat_interleave(probe))
    best_s = torch.full((Q, k), -np.inf)
    best_i = torch.full((Q, k), -1, dtype=torch.int64)
    for b in range(lists):
        qs_all, xs_all = q_of[b], in_x[b]
        for qs in torch.split(qs_all, block):
            for xs in torch.split(xs_all, block):
                sim = q[qs] @ x[xs].T  # (<= block, <= block)
                if same:
                    sim[qs[:, None] == xs[None, :]] = -np.inf
                ts, ti = sim.topk(min(k, len(xs)), dim=1)
                cand_s = torch.cat([best_s[qs], ts], 1)
                cand_i = torch.cat([best_i[qs], xs[ti]], 1)
                top, at = cand_s.topk(k, dim=1)
                best_s[qs], best_i[qs] = top, cand_i.gather(1, at)
    found = torch.isfinite(best_s)
    return (torch.where(found, 1 - best_s, torch.full_like(best_s, np.inf)).numpy(),
            torch.where(found, best_i, torch.full_like(best_i, -1)).numpy())


def _members(of: torch.Tensor, lists: int, items: torch.Tensor | None = None) -> list[torch.Tensor]:
    """For each bucket, the items (default: the positions) whose bucket ``of`` names it, in order."""
    order = torch.argsort(of, stable=True)
    counts = torch.bincount(of, minlength=lists).tolist()
    return list(torch.split(order if items is None else items[order], counts))


def search(x: torch.Tensor, k: int, *, queries: torch.Tensor | None = None, exclude_self: bool = True,
           block: int = 4096, exact_max: int = EXACT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn` (exact) while the data and the queries hold at most ``exact_max`` vectors, else
    :func:`knn_buckets`."""
    if max(len(x), len(x) if queries is None else len(queries)) <= exact_max:
        return knn(x, k, queries=queries, exclude_self=exclude_self, block=block)
    return knn_buckets(x, k, queries=queries, exclude_self=exclude_self, block=block)
