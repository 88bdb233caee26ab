"""Is model A better than model B on this test set? Paired tests on the same test images.

Two models scored on the same test images are paired observations: image i is right or wrong
for each. Two tests follow from that, both computed from the saved test logits:

- **McNemar's exact test** (McNemar 1947; recommended for comparing classifiers on one test set by
  Dietterich 1998, "Approximate statistical tests for comparing supervised classification learning
  algorithms"). Only the discordant images carry information: ``n01`` images that A gets wrong and B
  right, ``n10`` images that A gets right and B wrong (Dietterich's notation). Under "equally
  accurate" each discordant image goes either way with probability 1/2, so the exact two-sided p
  is ``min(1, 2 * P[Binomial(n01 + n10, 1/2) <= min(n01, n10)])`` (statsmodels' ``mcnemar(exact=True)``).
- **A paired bootstrap interval** of the accuracy difference ``acc(A) - acc(B)`` (Efron & Tibshirani
  1993, percentile interval): test images are resampled with replacement, the same draw for both
  models. The difference of one resample depends only on how many of the drawn images are of the
  kinds "A right, B wrong" and "A wrong, B right", so a resample is one multinomial draw of those
  counts (``numpy.random.Generator.multinomial``): the exact bootstrap distribution, vectorised
  over all resamples in O(resamples) memory instead of an (resamples x images) index matrix.

Over seeds (groups of runs of one config, see :mod:`cifarlab.evaluation.groups`), the runs of A and
B are independent samples of their training randomness: Welch's t-test on the per-seed accuracies
and the Welch-Satterthwaite 95% interval of the difference of means (``scipy.stats.ttest_ind``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy.stats import binom, ttest_ind
from scipy.stats import t as student_t

from ..errors import CifarlabError

ALPHA = 0.05  # the verdicts' significance level (two-sided)
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONVENTION = "n01: test images A gets wrong and B right; n10: A right and B wrong"


def correct_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) bool: is the top-1 prediction right? (argmax of the logits, as every report scores it)"""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise CifarlabError(f"logits of shape {logits.shape} do not match {len(labels)} labels")
    return logits.argmax(1) == labels


def _paired(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise CifarlabError(f"paired tests need predictions on the same test images ({a.shape} vs {b.shape})")
    if not len(a):
        raise CifarlabError("paired tests need at least one test image")
    return a, b


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test on two models' right/wrong per test image (see the module docstring)."""
    a, b = _paired(correct_a, correct_b)
    n01 = int(np.sum(~a & b))
    n10 = int(np.sum(a & ~b))
    n = n01 + n10
    p = 1.0 if n == 0 else min(1.0, 2.0 * float(binom.cdf(min(n01, n10), n, 0.5)))
    return {"p_value": p, "n01": n01, "n10": n10, "discordant": n, "convention": CONVENTION}


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                     confidence: float = 0.95, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Accuracy difference ``acc(A) - acc(B)`` and its paired-bootstrap percentile interval."""
    a, b = _paired(correct_a, correct_b)
    if resamples < 1:
        raise CifarlabError(f"bootstrap resamples must be >= 1, got {resamples}")
    n = len(a)
    n10 = int(np.sum(a & ~b))  # +1 to the difference per drawn image
    n01 = int(np.sum(~a & b))  # -1
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [n10 / n, n01 / n, (n - n10 - n01) / n], size=resamples)  # (resamples, 3)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    lo, hi = np.quantile(diffs, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"acc_a": float(a.mean()), "acc_b": float(b.mean()), "diff": float((n10 - n01) / n),
            "ci_low": float(lo), "ci_high": float(hi), "confidence": confidence, "resamples": resamples,
            "seed": seed}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, sample standard deviation and Student-t interval of the mean over seeds (None for n < 2)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None, "confidence": confidence}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci_low": None, "ci_high": None, "confidence": confidence}
    std = float(x.std(ddof=1))
    half = float(student_t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half,
            "confidence": confidence}


def welch(acc_a: Sequence[float], acc_b: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Welch's t-test and interval for the difference of mean accuracies over two sets of seeds."""
    a, b = np.asarray(acc_a, dtype=np.float64), np.asarray(acc_b, dtype=np.float64)
    out: dict[str, Any] = {"n_a": len(a), "n_b": len(b), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
                           "diff": float(a.mean() - b.mean()), "p_value": None, "ci_low": None, "ci_high": None,
                           "confidence": confidence, "test": "Welch's t-test over seeds"}
    if len(a) < 2 or len(b) < 2:
        return out  # no spread to test against
    if a.var(ddof=1) + b.var(ddof=1) == 0:  # every seed scores alike: no spread, a difference is all there is
        out["p_value"] = 1.0 if out["diff"] == 0 else 0.0
        out["ci_low"] = out["ci_high"] = out["diff"]
        return out
    res = ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(confidence)
    out.update(p_value=float(res.pvalue), ci_low=float(ci.low), ci_high=float(ci.high), df=float(res.df))
    return out


def verdict(name_a: str, name_b: str, diff: float, p_value: float | None, *, alpha: float = ALPHA,
            what: str = "at this test-set size") -> str:
    """One line saying what the numbers support: "A > B, p = 0.003" or "no detectable difference ..."."""
    if p_value is None:
        return f"not testable {what} (too few runs)"
    if p_value < alpha and diff != 0:
        hi, lo = (name_a, name_b) if diff > 0 else (name_b, name_a)
        return f"{hi} > {lo}, p = {format_p(p_value)}"
    return f"no detectable difference {what} (p = {format_p(p_value)})"


def format_p(p: float) -> str:
    if p < 1e-4:
        return f"{p:.1e}"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.4f}"


def compare_pair(name_a: str, name_b: str, logits_a: np.ndarray, logits_b: np.ndarray, labels: np.ndarray,
                 **bootstrap_kwargs) -> dict[str, Any]:
    """Both paired tests of two runs scored on the same test labels, with the verdict."""
    ca, cb = correct_from_logits(logits_a, labels), correct_from_logits(logits_b, labels)
    boot = paired_bootstrap(ca, cb, **bootstrap_kwargs)
    mc = mcnemar_exact(ca, cb)
    return {"a": name_a, "b": name_b, "num_test": int(len(labels)), "acc_a": boot["acc_a"], "acc_b": boot["acc_b"],
            "acc_diff": boot["diff"], "bootstrap": boot, "mcnemar": mc,
            "verdict": verdict(name_a, name_b, boot["diff"], mc["p_value"])}


def compare_groups(name_a: str, name_b: str, logits_a: Sequence[np.ndarray], logits_b: Sequence[np.ndarray],
                   labels: np.ndarray, seeds_a: Sequence[Any] | None = None,
                   seeds_b: Sequence[Any] | None = None) -> dict[str, Any]:
    """Two groups of runs (one or more seeds each): Welch over the seeds, and both paired tests per seed pair.

    Seed pairs are (A's k-th run, B's k-th run) for k up to the smaller group; the top-level
    ``mcnemar`` and ``bootstrap`` are the first seed pair's, ``per_seed`` holds every pair.
    """
    seeds_a = list(seeds_a) if seeds_a is not None else list(range(len(logits_a)))
    seeds_b = list(seeds_b) if seeds_b is not None else list(range(len(logits_b)))
    acc_a = [float(correct_from_logits(x, labels).mean()) for x in logits_a]
    acc_b = [float(correct_from_logits(x, labels).mean()) for x in logits_b]
    over = welch(acc_a, acc_b)
    per_seed = []
    for k in range(min(len(logits_a), len(logits_b))):
        pair = compare_pair(f"{name_a}[{seeds_a[k]}]", f"{name_b}[{seeds_b[k]}]", logits_a[k], logits_b[k], labels)
        pair.update(seed_a=seeds_a[k], seed_b=seeds_b[k])
        per_seed.append(pair)
    significant = sum(1 for p in per_seed if p["mcnemar"]["p_value"] < ALPHA)
    return {"a": name_a, "b": name_b, "num_test": int(len(labels)), "acc_a": over["mean_a"], "acc_b": over["mean_b"],
            "acc_diff": over["diff"], "over_seeds": over, "per_seed": per_seed,
            "mcnemar": per_seed[0]["mcnemar"], "bootstrap": per_seed[0]["bootstrap"],
            "seed_pairs_significant": significant,
            "verdict": verdict(name_a, name_b, over["diff"], over["p_value"],
                               what=f"over {len(acc_a)} and {len(acc_b)} seeds"),
            "verdict_per_seed": f"McNemar p < {ALPHA} in {significant} of {len(per_seed)} seed pairs"}


def pairwise(entries: Sequence[tuple[str, Sequence[np.ndarray], Sequence[Any]]], labels: np.ndarray) -> list[dict]:
    """Every pair (i < j) of ``(name, [logits per seed], [seed ids])`` entries: single runs with
    :func:`compare_pair`, groups (any entry with several seeds) with :func:`compare_groups`."""
    out = []
    for i in range(len(entries)):
        for j in range(i + 1, len(entries)):
            (na, la, sa), (nb, lb, sb) = entries[i], entries[j]
            if len(la) == 1 and len(lb) == 1:
                out.append(compare_pair(na, nb, la[0], lb[0], labels))
            else:
                out.append(compare_groups(na, nb, la, lb, labels, sa, sb))
    return out
