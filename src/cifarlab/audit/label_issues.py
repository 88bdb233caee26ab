"""Label issues by confident learning (Northcutt, Jiang and Chuang 2021, "Confident Learning: Estimating
Uncertainty in Dataset Labels", JAIR 70), on out-of-sample predicted probabilities.

1. Per-class thresholds ``t_j``: the mean predicted probability of class j over the images labelled j
   (the class's mean self-confidence).
2. The confident joint ``C[i, j]``: images labelled i whose probability of j reaches ``t_j`` (of several
   such classes, the most probable one), counted as "given i, truly j".
3. ``C`` calibrated so that each row sums to the number of images labelled i; then, as cleanlab's default
   (``prune_by_noise_rate``), for every off-diagonal cell (i, j) the ``C[i, j]`` images labelled i with the
   largest margin ``p_j - p_i`` are issues; an image whose most probable class is its label never is.
4. Ranked by label quality: self-confidence ``p_given``, or the normalized margin
   ``(1 + p_given - max_{j != given} p_j) / 2``; both in [0, 1], lower is worse.

Written here on the probabilities (numpy only) rather than imported: cleanlab, the reference implementation,
is AGPL; tests/test_audit.py checks this one against ``cleanlab.filter.find_label_issues``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CifarlabError

METHODS = ("self_confidence", "normalized_margin")


def confident_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K,) mean self-confidence of each class's images; 1.0 for a class without images (never confident)."""
    K = probs.shape[1]
    counts = np.bincount(labels, minlength=K)
    sums = np.bincount(labels, weights=probs[np.arange(len(labels)), labels], minlength=K)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)


def confident_joint(probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, guess): C (K, K) counts given label (rows) against confident true label (columns), at least 1 on
    the diagonal; guess (N,) the confident label of each image, -1 where no class reaches its threshold."""
    K = probs.shape[1]
    confident = probs >= thresholds - 1e-6  # (N, K); the tolerance is cleanlab's, for ties at the mean
    guess = np.where(confident.any(1), np.where(confident, probs, -1.0).argmax(1), -1)
    seen = guess >= 0
    C = np.zeros((K, K), np.int64)
    np.add.at(C, (labels[seen], guess[seen]), 1)
    np.fill_diagonal(C, np.maximum(C.diagonal(), 1))
    return C, guess


def calibrate(C: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Rows rescaled to the class counts, rounded so that each row keeps its total (largest remainders)."""
    scaled = C / C.sum(1, keepdims=True) * counts[:, None]
    out = np.floor(scaled).astype(np.int64)
    for i in range(len(out)):
        short = int(round(counts[i] - out[i].sum()))
        if short > 0:
            out[i, np.argsort(-(scaled[i] - out[i]), kind="stable")[:short]] += 1
    return out


def quality(probs: np.ndarray, labels: np.ndarray, method: str = "self_confidence") -> np.ndarray:
    """(N,) label quality in [0, 1], lower is worse."""
    if method not in METHODS:
        raise CifarlabError(f"unknown ranking {method!r}: expected {' or '.join(METHODS)}")
    rows = np.arange(len(labels))
    self_conf = probs[rows, labels]
    if method == "self_confidence":
        return self_conf
    others = probs.copy()
    others[rows, labels] = -np.inf
    return (1.0 + self_conf - others.max(1)) / 2.0


@dataclass
class LabelIssues:
    issue: np.ndarray  # (N,) bool: flagged by confident learning
    score: np.ndarray  # (N,) label quality, lower is worse
    suggested: np.ndarray  # (N,) the most likely other label (the confident one where there is one)
    thresholds: np.ndarray  # (K,)
    joint: np.ndarray  # (K, K) the calibrated confident joint, given label (rows) against true (columns)

    def ranked(self) -> np.ndarray:
        """Indices of the issues, worst first."""
        idx = np.flatnonzero(self.issue)
        return idx[np.argsort(self.score[idx], kind="stable")]


def find_label_issues(probs: np.ndarray, labels: np.ndarray, method: str = "self_confidence") -> LabelIssues:
    """Confident learning on out-of-sample ``probs`` (N, K) and given ``labels`` (N,); see the module."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    N, K = probs.shape
    thresholds = confident_thresholds(probs, labels)
    C, guess = confident_joint(probs, labels, thresholds)
    joint = calibrate(C, np.bincount(labels, minlength=K))
    issue = np.zeros(N, bool)
    for i in range(K):
        mine = np.flatnonzero(labels == i)
        if len(mine) <= 1:
            continue
        for j in range(K):
            n = min(int(joint[i, j]), len(mine) - 1)  # at least one image kept per class, as cleanlab does
            if j != i and n > 0:
                margin = probs[mine, j] - probs[mine, i]
                issue[mine[np.argsort(-margin, kind="stable")[:n]]] = True
    issue &= probs.argmax(1) != labels
    others = probs.copy()
    others[np.arange(N), labels] = -np.inf
    suggested = np.where((guess >= 0) & (guess != labels), guess, others.argmax(1))
    return LabelIssues(issue, quality(probs, labels, method), suggested, thresholds, joint)
