"""Nearest neighbours by cosine distance in blocks, so that a million images fit in memory.

Exact search, by blocked matrix products: the queries in blocks of ``block`` rows against the data in blocks
of ``block`` rows, keeping the running top ``k`` of each query. Time O(N^2 d) multiply-adds (the products
are BLAS / cuBLAS matrix multiplications); memory O(N k) for the result plus O(block^2) for one block of
similarities and O(N d) for the (float32) vectors themselves: at N = 1,000,000, d = 256, k = 5 and
block = 4096, 1.0 GB of vectors, 40 MB of results and 64 MB per block. An approximate index (FAISS, HNSW)
would be faster at that size; it would be a dependency for a search that runs once per audit.
"""

from __future__ import annotations

import numpy as np
import torch


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
