"""The group-ranking metrics on cases computed by hand."""
import math

import numpy as np
import pytest

from mucs import ranking as R

# pred ranks groups 0, 2, 3, 1; the truth ranks 1, 2, 0, 3
PRED, TRUE = [0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.6, 0.1]


def test_top1_and_mrr():
    assert R.top1_agreement(PRED, TRUE) == 0.0
    assert R.mrr(PRED, TRUE) == 0.25  # the true top group (1) is 4th in the prediction
    assert R.mrr([0.1, 0.9, 0.5, 0.0], TRUE) == 1.0 and R.top1_agreement([0.1, 0.9, 0.5, 0.0], TRUE) == 1.0
    assert R.mrr([0.9, 0.5, 0.1, 0.0], TRUE) == 0.5


def test_ndcg_at_3():
    # relevances from the truth: group 1 -> 3, group 2 -> 2, group 0 -> 1, group 3 -> 0; prediction's top 3 is 0, 2, 3
    assert list(R.graded_relevance(TRUE, 3)) == [1, 3, 2, 0]
    dcg = 1 / math.log2(2) + 2 / math.log2(3) + 0
    ideal = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert R.ndcg_at(PRED, TRUE, 3) == pytest.approx(dcg / ideal)
    assert R.ndcg_at(TRUE, TRUE, 3) == pytest.approx(1.0)
    # known relevances given directly: the prediction's top 3 (0, 2, 3) carries 0, 1, 2 of the ideal 2, 1, 0
    assert R.ndcg_at(PRED, TRUE, 3, relevance=[0, 2, 1, 2]) == pytest.approx(
        (0 + 1 / math.log2(3) + 2 / math.log2(4)) / (2 + 2 / math.log2(3) + 1 / math.log2(4)))


def test_top3_overlap():
    assert R.topk_overlap(PRED, TRUE, 3) == pytest.approx(2 / 3)  # {0, 2, 3} & {1, 2, 0}
    assert R.topk_overlap([1, 2], [2, 1], 3) == 1.0  # K < k: both whole lists


def test_rbo_by_hand():
    # prefix overlaps X_1..X_4 = 0, 1, 2, 4;  RBO_ext = X_4/4 p^4 + (1-p)/p sum_d X_d/d p^d
    p = 0.9
    by_hand = 0.6561 + (0.1 / 0.9) * (0 + 0.5 * 0.81 + (2 / 3) * 0.729 + 1 * 0.6561)
    assert R.rbo(PRED, TRUE, p) == pytest.approx(by_hand)
    assert by_hand == pytest.approx(0.82800, abs=1e-5)
    assert R.rbo(TRUE, TRUE, p) == pytest.approx(1.0)
    # reversed pair of 2: X_1 = 0, X_2 = 2 -> 2/2 p^2 + (1-p)/p (0 + 2/2 p^2) = p^2 + (1-p) p
    assert R.rbo([1, 0], [0, 1], p) == pytest.approx(p ** 2 + (1 - p) * p)


def test_spearman_and_ties():
    # ranks 4,1,3,2 vs 2,4,3,1: sum d^2 = 14, rho = 1 - 6*14 / (4*15)
    assert R.spearman(PRED, TRUE) == pytest.approx(1 - 6 * 14 / 60)
    assert R.spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert math.isnan(R.spearman([1, 1, 1], TRUE[:3]))
    assert list(R.ranking([1.0, 1.0, 0.0, 2.0])) == [3, 0, 1, 2]  # ties by group number


def test_agreement_matrix():
    out = R.agreement(np.array([PRED, TRUE]), np.array([TRUE, TRUE]))
    assert out["top1"] == [0.0, 1.0] and out["mrr"] == [0.25, 1.0] and out["rbo"][1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        R.agreement(np.array([PRED]), np.array([TRUE[:3]]))
