"""Small statistics for the quality benchmark: Wilson intervals for rates, AUROC with a
bootstrap interval. Exact formulas, no SciPy needed."""

from __future__ import annotations

import math
import random


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate (sensible at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def auroc(positives: list[float], negatives: list[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def auroc_interval(positives: list[float], negatives: list[float], resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the AUROC, resampling each class separately."""
    if not positives or not negatives:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    values = sorted(auroc(rng.choices(positives, k=len(positives)), rng.choices(negatives, k=len(negatives)))
                    for _ in range(resamples))
    return (values[int(0.025 * resamples)], values[min(resamples - 1, int(0.975 * resamples))])
