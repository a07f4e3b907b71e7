"""Sampling noise of accuracy numbers: Wilson intervals, paired differences, the exact McNemar test and Holm's
correction.

An accuracy is a proportion over a finite image set, so every number the toolkit prints comes with its sample
size and a 95% interval; two artifacts evaluated on the same images are compared image by image (paired),
which is far more sensitive than comparing two independent proportions. The artifact gate
(verify/artifact_gate.py) and the CI regression gate (report/regression_gate.py) both judge with these.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a proportion: honest at small n and near 0 or 1."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_counts(first_ok: np.ndarray, second_ok: np.ndarray) -> tuple[int, int, int, int]:
    """(both right, only first right, only second right, both wrong) over the same images."""
    a, b = np.asarray(first_ok, bool), np.asarray(second_ok, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same images: {a.shape} vs {b.shape}")
    return int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum())


def paired_difference_interval(both: int, first_only: int, second_only: int, neither: int,
                               z: float = 1.96) -> tuple[float, float]:
    """95% interval of p_first - p_second for paired proportions (Newcombe 1998, method 10: built from the two
    Wilson intervals and the pairing correlation), so it stays inside [-1, 1] and honest at 0 discordant."""
    n = both + first_only + second_only + neither
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (both + first_only) / n, (both + second_only) / n
    l1, u1 = wilson_interval(both + first_only, n, z)
    l2, u2 = wilson_interval(both + second_only, n, z)
    margins = (both + first_only) * (second_only + neither) * (both + second_only) * (first_only + neither)
    phi = (both * neither - first_only * second_only) / float(np.sqrt(margins)) if margins else 0.0
    theta = p1 - p2
    lo = theta - float(np.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)))
    hi = theta + float(np.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)))
    return max(-1.0, lo), min(1.0, hi)


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly (integer arithmetic: no tail underflow at large n)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def mcnemar_drop_pvalue(lost: int, gained: int) -> float:
    """One-sided exact McNemar test that a change lost more images than it gained: of the `lost + gained`
    discordant images, under 'no change' each is equally likely to go either way."""
    return binomial_tail(lost, lost + gained)


def smallest_detectable_drop(discordant: int, alpha: float) -> int:
    """The smallest net loss (lost - gained, in images) that the one-sided exact test calls significant at
    `alpha` when `discordant` images changed; with too few discordant images, the net loss that would need
    every one of them to go the same way."""
    for lost in range((discordant + 1) // 2, discordant + 1):
        if mcnemar_drop_pvalue(lost, discordant - lost) <= alpha:
            return 2 * lost - discordant
    return max(1, math.ceil(math.log2(1.0 / alpha))) if alpha > 0 else discordant + 1


def holm_significant(pvalues: Sequence[float], alpha: float) -> list[bool]:
    """Holm's step-down correction: which of `pvalues` stay significant at family-wise level `alpha`."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out = [False] * len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - rank):
            break
        out[i] = True
    return out
