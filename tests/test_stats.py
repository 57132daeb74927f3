"""AUC, Ratio, p-values and overlap against hand-computed cases."""
import numpy as np
import pytest
from scipy import stats as ss

from mucs import stats


def test_auc_hand_computed():
    # method changes targets more (lower similarity) than random: every random value is higher
    assert stats.auc([0.1, 0.2], [0.3, 0.4, 0.5]) == 1.0
    assert stats.auc([0.6, 0.7], [0.3, 0.4]) == 0.0
    # pairs (m, r): (0.2,0.1)<, (0.2,0.3)>, (0.4,0.1)<, (0.4,0.3)< and one tie (0.3, 0.3) counted half
    assert stats.auc([0.2, 0.4], [0.1, 0.3]) == pytest.approx(1 / 4)
    assert stats.auc([0.3], [0.3, 0.5]) == pytest.approx((0.5 + 1) / 2)


def test_auc_equals_sklearn_roc_with_random_as_positive():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 30), rng.normal(0.5, 1, 40)
    y = np.r_[np.zeros(30), np.ones(40)]
    assert stats.auc(a, b) == pytest.approx(roc_auc_score(y, np.r_[a, b]))


def test_ratio_hand_computed():
    # values 0.8 and 1.0 against a random median of 1.0: -20% and 0%, mean -10%
    m, lo, hi = stats.ratio([0.8, 1.0], [1.0, 1.0])
    assert m == pytest.approx(-10.0)
    half = ss.t.ppf(0.975, 1) * np.std([-20, 0], ddof=1) / np.sqrt(2)
    assert (lo, hi) == pytest.approx((-10 - half, -10 + half))
    # distances: twice the random distance is more change, so the ratio is negative
    assert stats.ratio([2.0], [1.0], higher_is_similar=False)[0] == pytest.approx(-100.0)


def test_pvalues_one_and_two_sided():
    a, b = [0.1, 0.2, 0.3, 0.35], [0.5, 0.6, 0.7, 0.8]
    p1 = stats.pvalue(a, b)
    assert p1 == pytest.approx(ss.mannwhitneyu(a, b, alternative="less").pvalue)
    assert p1 < 0.05
    assert stats.pvalue(b, a) > 0.9  # the other direction is not significant
    p2 = stats.pvalue(a, b, two_sided=True)
    assert p2 == pytest.approx(ss.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    assert stats.pvalue([1, 1], [1, 1]) == 1.0


def test_overlap():
    assert stats.overlap_within([[1, 2, 3, 4], [3, 4, 5, 6], [7, 8, 9, 10]]) == pytest.approx((2 / 4 + 0 + 0) / 3)
    assert stats.overlap_between([[1, 2], [3, 4]], [[2, 9], [3, 4]]) == pytest.approx((0.5 + 1) / 2)
