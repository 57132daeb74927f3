"""Agreement of a predicted ranking of groups with a ground-truth one, per query: pure functions of two score
vectors over the same K groups (higher = ranked first). Ties are broken by group number, the same way for both.

  top1_agreement   1 if both put the same group first
  mrr              1 / (rank of the true top group in the prediction)
  ndcg_at          NDCG@k with graded relevance k, k-1, ..., 1 for the true top k groups (0 for the rest)
  topk_overlap     |top k of the prediction  &  top k of the truth| / k  (k <= K)
  rbo              rank-biased overlap (Webber et al. 2010, extrapolated form, Eq. 32) with persistence p
  spearman         Spearman correlation of the two score vectors (average ranks for ties)
"""
import math

import numpy as np
from scipy.stats import spearmanr


def ranking(s):
    """Group numbers from first to last: descending score, ties by group number."""
    s = np.asarray(s, dtype=float)
    return np.lexsort((np.arange(len(s)), -s))


def top1_agreement(pred, true):
    return float(ranking(pred)[0] == ranking(true)[0])


def mrr(pred, true):
    top = ranking(true)[0]
    return 1.0 / (1 + int(np.nonzero(ranking(pred) == top)[0][0]))


def graded_relevance(true, k):
    """rel_g = k + 1 - rank_g for the true top k groups (k, k-1, ..., 1), 0 for the others."""
    rel = np.zeros(len(true))
    rel[ranking(true)[:k]] = np.arange(k, 0, -1)[: min(k, len(true))]
    return rel


def ndcg_at(pred, true, k=3, relevance=None):
    """DCG@k of the prediction's top k over the ideal DCG@k; `relevance` defaults to graded_relevance(true, k)."""
    rel = graded_relevance(true, k) if relevance is None else np.asarray(relevance, dtype=float)
    disc = 1 / np.log2(np.arange(2, k + 2))[: min(k, len(rel))]
    dcg = float((rel[ranking(pred)[:k]] * disc).sum())
    ideal = float((np.sort(rel)[::-1][:k] * disc).sum())
    return dcg / ideal if ideal > 0 else math.nan


def topk_overlap(pred, true, k=3):
    return len(set(ranking(pred)[:k].tolist()) & set(ranking(true)[:k].tolist())) / min(k, len(true))


def rbo(pred, true, p=0.9):
    """RBO_ext of the two full rankings: (X_K / K) p^K + (1 - p) / p * sum_{d=1..K} (X_d / d) p^d, where X_d is
    the overlap of the two top-d prefixes. 1 for identical rankings."""
    a, b = ranking(pred), ranking(true)
    K = len(a)
    X = np.array([len(set(a[:d].tolist()) & set(b[:d].tolist())) for d in range(1, K + 1)], dtype=float)
    d = np.arange(1, K + 1)
    return float(X[-1] / K * p ** K + (1 - p) / p * (X / d * p ** d).sum())


def spearman(pred, true):
    pred, true = np.asarray(pred, dtype=float), np.asarray(true, dtype=float)
    if np.ptp(pred) == 0 or np.ptp(true) == 0:
        return math.nan  # a constant vector has no ranking
    return float(spearmanr(pred, true).statistic)


METRICS = {"top1": top1_agreement, "mrr": mrr, "ndcg@3": lambda a, b: ndcg_at(a, b, 3),
           "top3_overlap": lambda a, b: topk_overlap(a, b, 3), "rbo": lambda a, b: rbo(a, b, 0.9),
           "spearman": spearman}


def agreement(pred, true):
    """{metric: [value per query]} for score matrices pred, true [Q, K]."""
    pred, true = np.asarray(pred, dtype=float), np.asarray(true, dtype=float)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and true {true.shape} must both be [queries, groups]")
    return {name: [f(p, t) for p, t in zip(pred, true)] for name, f in METRICS.items()}
