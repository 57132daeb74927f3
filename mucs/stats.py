"""The statistics of the counterfactual evaluation: AUC and Ratio against random removal, Mann-Whitney
p-values, and overlap of attributed id sets. Inputs are similarities: higher = post more like pre."""
import itertools

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
