"""The statistics of the evaluations: AUC and Ratio against random removal, Mann-Whitney p-values and overlap of
attributed id sets (inputs are similarities: higher = post more like pre); the percentile bootstrap; the rank of a
known answer and its recall and mean reciprocal rank."""
import itertools
import math

import numpy as np
from scipy import stats


def auc(sim_method, sim_random):
    """P(random leaves a sample more similar than the method does), ties counted half: the ROC AUC with
    the method's similarities as class 0 and random's as class 1. 0.5 = no better than random."""
    a, b = np.asarray(sim_method, float), np.asarray(sim_random, float)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    greater = (b[None, :] > a[:, None]).sum()
    ties = (b[None, :] == a[:, None]).sum()
    return float((greater + 0.5 * ties) / (len(a) * len(b)))


def ratio(values, random_median, higher_is_similar=True, level=0.95):
    """Mean of 100 * (v / median(v_random) - 1) in percent, with a t-interval. Negative = more change than
    random; for distances (higher_is_similar False) the sign is flipped so that this still holds."""
    r = 100 * (np.asarray(values, float) / np.asarray(random_median, float) - 1)
    r = r if higher_is_similar else -r
    m = float(r.mean())
    if len(r) < 2:
        return m, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(r) - 1) * r.std(ddof=1) / np.sqrt(len(r))
    return m, m - half, m + half


def pvalue(sim_method, sim_random, two_sided=False):
    """Mann-Whitney U: one-sided 'method leaves samples less similar than random', or two-sided."""
    a, b = np.asarray(sim_method, float), np.asarray(sim_random, float)
    if len(a) == 0 or len(b) == 0 or (np.all(a == a[0]) and np.all(b == a[0])):
        return float("nan") if len(a) == 0 or len(b) == 0 else 1.0
    alt = "two-sided" if two_sided else "less"
    return float(stats.mannwhitneyu(a, b, alternative=alt).pvalue)


def overlap_within(id_sets):
    """Mean |A_t & A_u| / |A_t| over pairs of different targets of one method."""
    sets = [set(map(int, s)) for s in id_sets]
    pairs = [len(a & b) / max(1, len(a)) for a, b in itertools.combinations(sets, 2)]
    return float(np.mean(pairs)) if pairs else float("nan")


def overlap_between(ids_a, ids_b):
    """Mean over targets of |A_t & B_t| / |A_t|: do two methods remove the same items for a target?"""
    vals = [len(set(map(int, a)) & set(map(int, b))) / max(1, len(a)) for a, b in zip(ids_a, ids_b)]
    return float(np.mean(vals)) if vals else float("nan")


def bootstrap(values, B=1000, seed=0, level=0.95, clusters=None):
    """(mean, lo, hi): the mean of the finite values and a percentile interval from B resamples of them. With
    `clusters` (one label per value) whole clusters are resampled, so values that share one (the samples of one
    customized model) count as one draw."""
    v = np.asarray(values, dtype=float)
    keep = np.isfinite(v)
    v = v[keep]
    if len(v) == 0:
        return np.nan, np.nan, np.nan
    rng = np.random.default_rng(seed)
    if clusters is None:
        means = v[rng.integers(0, len(v), (int(B), len(v)))].mean(1)
    else:
        c = np.unique(np.asarray(clusters, dtype=str)[keep], return_inverse=True)[1].ravel()
        k = int(c.max()) + 1
        sums, counts = np.bincount(c, v, k), np.bincount(c, minlength=k)
        pick = rng.integers(0, k, (int(B), k))
        means = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def known_rank(scores, answer):
    """The rank (0: first) of a known answer in one row of scores [n]: how many candidates outside `answer` (a bool
    mask [n]: the known item and its exact duplicates) score at least as high as the answer's best. Ties count
    against the method, so constant scores put the answer last."""
    scores, answer = np.asarray(scores, dtype=float), np.asarray(answer, dtype=bool)
    return int((scores[~answer] >= scores[answer].max()).sum())


def recall_cutoffs(n):
    """{name: k}: a hit is a rank below k, among n candidates (1% of them rounded up)."""
    return {"recall@1": 1, "recall@10": 10, "recall@1%": max(1, math.ceil(0.01 * n))}


def known_summary(ranks, n, clusters=None, B=1000, seed=0):
    """{statistic: (mean, lo, hi)} of ranks (0: first) among n[i] candidates each: recall@1, @10, @1% and the mean
    reciprocal rank 1 / (rank + 1), with bootstrap intervals over the items (or their clusters)."""
    r, n = np.asarray(ranks, dtype=float), np.broadcast_to(np.asarray(n), np.shape(ranks))
    out = {name: bootstrap([ri < k for ri, k in zip(r, [recall_cutoffs(m)[name] for m in n])], B, seed,
                           clusters=clusters) for name in recall_cutoffs(1)}
    out["mrr"] = bootstrap(1 / (r + 1), B, seed, clusters=clusters)
    return out
