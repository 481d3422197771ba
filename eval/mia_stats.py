"""Honest membership-inference figures: selection on one half of the pairs, report on the other, with intervals.

Choosing an attack's timestep (or the strongest attack) with the labels of the very pairs the AUC is
then reported on inflates it. Here the member/non-member pairs are split into two folds (seeded);
each fold is scored with the candidate (attack, timestep) that did best on the *other* fold, and the
reported AUC and TPR are the mean of the two folds (cross-fitting, as in Chernozhukov et al. 2018's
cross-fitting of nuisance choices). Intervals are percentile bootstrap intervals (Efron & Tibshirani
1993) over pairs resampled within each fold, with the choices fixed. With n non-members the smallest
false-positive rate a ROC resolves is 1/n: the TPR is reported at max(1%, 1/n) and says which.

The bootstrap needs thousands of AUCs, so AUC and TPR are computed here with numpy from ranks (the
Mann-Whitney form of AUC); ``privdiff.eval.mia_attacks.audit`` (torchmetrics) gives the same numbers for
one set of scores, which the tests check.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.stats import rankdata

__all__ = ["auc", "bootstrap_interval", "crossfit", "roc_points", "tpr_at"]


def auc(scores: np.ndarray, member: np.ndarray) -> float:
    """ROC AUC of ``scores`` (higher = member): P(member score > non-member score), ties counted half."""
    ranks = rankdata(scores)
    n1, n0 = int(member.sum()), int((~member).sum())
    return float((ranks[member].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at(scores: np.ndarray, member: np.ndarray, fpr: float) -> float:
    """The largest TPR among the ROC's thresholds (score >= v is called a member) whose FPR is at most ``fpr``."""
    pos, neg = np.sort(scores[member]), np.sort(scores[~member])
    values = np.unique(scores)
    fp = len(neg) - np.searchsorted(neg, values, side="left")  # non-members at or above each threshold
    tp = len(pos) - np.searchsorted(pos, values, side="left")
    ok = fp / len(neg) <= fpr + 1e-12
    return float((tp[ok] / len(pos)).max()) if ok.any() else 0.0


def roc_points(scores: np.ndarray, member: np.ndarray, max_points: int = 200) -> dict[str, list[float]]:
    """The ROC curve's (fpr, tpr) points, thinned to at most ``max_points`` (for the report's plot)."""
    order = np.argsort(-scores, kind="stable")
    y = member[order]
    tpr = np.concatenate([[0.0], np.cumsum(y) / max(1, y.sum())])
    fpr = np.concatenate([[0.0], np.cumsum(~y) / max(1, (~y).sum())])
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).round().astype(int))
    return {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}


def low_fpr(num_nonmembers: int, asked: float = 0.01) -> float:
    """The false-positive rate a ROC over ``num_nonmembers`` resolves near ``asked``: max(asked, 1/n)."""
    return max(asked, 1.0 / max(1, num_nonmembers))


def folds(num_pairs: int, seed: int) -> list[np.ndarray]:
    """Two folds of pair indices (members i and non-members i go together), seeded."""
    order = np.random.default_rng(seed).permutation(num_pairs)
    half = num_pairs // 2
    return [np.sort(order[:half]), np.sort(order[half:])]


def _stats(scores: np.ndarray, member: np.ndarray, fpr: float) -> tuple[float, float]:
    return auc(scores, member), tpr_at(scores, member, fpr)


def bootstrap_interval(
    candidates: Mapping[str, np.ndarray], choice: list[str], parts: list[np.ndarray], n: int, fpr: float,
    resamples: int = 300, seed: int = 0, level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of the fold-mean AUC and TPR, resampling pairs within each fold (choices fixed).

    ``candidates`` maps a name to scores of 2n examples (members 0..n-1, non-members n..2n-1);
    ``choice[f]`` is the candidate scored on fold ``parts[f]``.
    """
    rng = np.random.default_rng(seed)
    aucs, tprs = [], []
    for _ in range(resamples):
        fold_auc, fold_tpr = [], []
        for name, part in zip(choice, parts):
            pairs = rng.choice(part, size=len(part), replace=True)
            rows = np.concatenate([pairs, pairs + n])
            member = np.concatenate([np.ones(len(pairs), bool), np.zeros(len(pairs), bool)])
            a, t = _stats(candidates[name][rows], member, fpr)
            fold_auc.append(a)
            fold_tpr.append(t)
        aucs.append(np.mean(fold_auc))
        tprs.append(np.mean(fold_tpr))
    tail = (1 - level) / 2 * 100
    return {"auc": tuple(float(v) for v in np.percentile(aucs, [tail, 100 - tail]).round(4)),
            "tpr": tuple(float(v) for v in np.percentile(tprs, [tail, 100 - tail]).round(4))}


def crossfit(candidates: Mapping[str, np.ndarray], n: int, seed: int = 0, asked_fpr: float = 0.01, resamples: int = 300) -> dict:
    """Choose the best candidate on one fold, report on the other, and average: AUC, TPR at a resolved FPR, intervals.

    ``candidates`` maps a name (``loss@t50``, ``pia``, ...) to scores of 2n examples, members
    first. Returns the chosen candidate per fold, the fold-mean AUC and TPR, their bootstrap
    intervals, and the FPR the TPR is taken at.
    """
    parts = folds(n, seed)
    fold_size = min(len(p) for p in parts)
    fpr = low_fpr(fold_size, asked_fpr)
    choice, fold_auc, fold_tpr = [], [], []
    for f, part in enumerate(parts):
        other = parts[1 - f]
        rows_o = np.concatenate([other, other + n])
        member_o = np.concatenate([np.ones(len(other), bool), np.zeros(len(other), bool)])
        best = max(candidates, key=lambda c: (auc(candidates[c][rows_o], member_o), c))
        rows = np.concatenate([part, part + n])
        member = np.concatenate([np.ones(len(part), bool), np.zeros(len(part), bool)])
        a, t = _stats(candidates[best][rows], member, fpr)
        choice.append(best)
        fold_auc.append(a)
        fold_tpr.append(t)
    intervals = bootstrap_interval(candidates, choice, parts, n, fpr, resamples=resamples, seed=seed)
    return {
        "chosen": choice, "auc": float(np.mean(fold_auc)), "auc_interval": list(intervals["auc"]),
        "tpr": float(np.mean(fold_tpr)), "tpr_interval": list(intervals["tpr"]), "fpr": fpr,
        "fold_size": fold_size, "fold_auc": [float(a) for a in fold_auc],
    }


def single(scores: np.ndarray, n: int, seed: int = 0, asked_fpr: float = 0.01, resamples: int = 300) -> dict:
    """One attack with nothing chosen: AUC and TPR on all pairs, with bootstrap intervals over pairs."""
    member = np.concatenate([np.ones(n, bool), np.zeros(n, bool)])
    fpr = low_fpr(n, asked_fpr)
    a, t = _stats(scores, member, fpr)
    intervals = bootstrap_interval({"x": scores}, ["x"], [np.arange(n)], n, fpr, resamples=resamples, seed=seed)
    return {"auc": a, "auc_interval": list(intervals["auc"]), "tpr": t, "tpr_interval": list(intervals["tpr"]), "fpr": fpr,
            "roc": roc_points(scores, member)}
