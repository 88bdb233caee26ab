"""Significance of a difference between models on one test set, checked against statsmodels and SciPy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from cifarlab.errors import CifarlabError
from cifarlab.evaluation.significance import (compare_groups, compare_pair, mcnemar_exact, paired_bootstrap,
                                              t_interval, verdict, welch)


def _pair(n: int, acc_a: float, acc_b: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random(n) < acc_a, rng.random(n) < acc_b


@pytest.mark.parametrize("n,acc_a,acc_b,seed", [(50, 0.7, 0.7, 0), (200, 0.8, 0.6, 1), (1000, 0.77, 0.78, 2),
                                                (10000, 0.9, 0.89, 3), (7, 0.5, 0.5, 4)])
def test_mcnemar_matches_statsmodels_and_scipy(n, acc_a, acc_b, seed):
    a, b = _pair(n, acc_a, acc_b, seed)
    res = mcnemar_exact(a, b)
    table = np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]])
    assert res["n10"] == table[0, 1] and res["n01"] == table[1, 0]
    ref = sm_mcnemar(table, exact=True)
    assert res["p_value"] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)
    if res["discordant"]:
        ref2 = stats.binomtest(res["n01"], res["discordant"], 0.5, alternative="two-sided")
        assert res["p_value"] == pytest.approx(ref2.pvalue, rel=1e-9, abs=1e-15)


def test_identical_models_p_one_and_clearly_better_small_p():
    a, _ = _pair(500, 0.8, 0.8, 5)
    same = mcnemar_exact(a, a)
    assert same == {**same, "p_value": 1.0, "n01": 0, "n10": 0}
    boot = paired_bootstrap(a, a)
    assert boot["diff"] == boot["ci_low"] == boot["ci_high"] == 0.0
    # B is A with 60 of A's right answers turned wrong: a clear, one-sided difference
    b = a.copy()
    b[np.flatnonzero(a)[:60]] = False
    better = mcnemar_exact(a, b)
    assert (better["n10"], better["n01"]) == (60, 0)
    assert better["p_value"] < 1e-15
    res = compare_pair("A", "B", _onehot(a), _onehot(b), np.zeros(len(a), np.int64))
    assert res["verdict"].startswith("A > B, p = ")
    res = compare_pair("B", "A", _onehot(b), _onehot(a), np.zeros(len(a), np.int64))
    assert res["verdict"].startswith("A > B, p = ")
    assert res["acc_diff"] == pytest.approx(-60 / 500)
    assert res["bootstrap"]["ci_high"] < 0


def _onehot(correct: np.ndarray) -> np.ndarray:
    """Logits whose argmax is class 0 (the label) where ``correct``, else class 1."""
    x = np.zeros((len(correct), 2), np.float32)
    x[correct, 0] = 1
    x[~correct, 1] = 1
    return x


def test_verdict_no_difference():
    a, b = _pair(300, 0.77, 0.78, 6)
    res = compare_pair("cnn", "resnet18", _onehot(a), _onehot(b), np.zeros(300, np.int64))
    if res["mcnemar"]["p_value"] >= 0.05:
        assert res["verdict"].startswith("no detectable difference at this test-set size")
    assert verdict("a", "b", 0.01, 0.2).startswith("no detectable difference at this test-set size")
    assert verdict("a", "b", 0.01, 0.003) == "a > b, p = 0.003"


def test_bootstrap_matches_scipy_paired_bootstrap():
    a, b = _pair(400, 0.75, 0.65, 7)
    ours = paired_bootstrap(a, b, resamples=20000, seed=1)
    ref = stats.bootstrap((a.astype(float), b.astype(float)), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                          paired=True, vectorized=True, n_resamples=20000, method="percentile",
                          random_state=np.random.default_rng(2)).confidence_interval
    assert ours["diff"] == pytest.approx(a.mean() - b.mean())
    # two Monte Carlo estimates of the same percentiles: they agree to within a resampling step or two
    assert ours["ci_low"] == pytest.approx(ref.low, abs=0.006)
    assert ours["ci_high"] == pytest.approx(ref.high, abs=0.006)
    assert ours["ci_low"] < ours["diff"] < ours["ci_high"]
    again = paired_bootstrap(a, b, resamples=20000, seed=1)
    assert again == ours  # seeded


def test_bootstrap_matches_index_resampling():
    """The multinomial shortcut equals resampling image indices: same distribution, checked by moments."""
    a, b = _pair(120, 0.6, 0.5, 8)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, len(a), size=(20000, len(a)))
    brute = a[idx].mean(1) - b[idx].mean(1)
    ours = paired_bootstrap(a, b, resamples=20000, seed=4)
    lo, hi = np.quantile(brute, [0.025, 0.975])
    step = 1 / len(a)
    assert abs(ours["ci_low"] - lo) <= 2 * step and abs(ours["ci_high"] - hi) <= 2 * step


def test_t_interval_and_welch_match_scipy():
    x = [0.77, 0.78, 0.76, 0.775]
    res = t_interval(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((lo, hi))
    assert res["std"] == pytest.approx(np.std(x, ddof=1))
    assert t_interval([0.5])["ci_low"] is None
    y = [0.73, 0.74, 0.72]
    w = welch(x, y)
    ref = stats.ttest_ind(x, y, equal_var=False)
    assert w["p_value"] == pytest.approx(ref.pvalue)
    assert w["diff"] == pytest.approx(np.mean(x) - np.mean(y))


def test_groups_per_seed_and_over_seeds():
    labels = np.zeros(400, np.int64)
    runs_a = [_onehot(_pair(400, 0.85, 0, s)[0]) for s in range(3)]
    runs_b = [_onehot(_pair(400, 0.70, 0, 10 + s)[0]) for s in range(3)]
    res = compare_groups("A", "B", runs_a, runs_b, labels)
    assert len(res["per_seed"]) == 3
    assert res["over_seeds"]["p_value"] < 0.05 and res["verdict"].startswith("A > B")
    for k, p in enumerate(res["per_seed"]):
        ref = mcnemar_exact(runs_a[k].argmax(1) == 0, runs_b[k].argmax(1) == 0)
        assert p["mcnemar"] == ref
    assert res["mcnemar"] == res["per_seed"][0]["mcnemar"]


def test_mismatched_inputs_refused():
    with pytest.raises(CifarlabError, match="same test images"):
        mcnemar_exact(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(CifarlabError, match="at least one"):
        paired_bootstrap(np.ones(0, bool), np.ones(0, bool))
