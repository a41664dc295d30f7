"""Modes of a Gaussian mixture: which components belong to one bump of the density.

A mixture fitted with enough components (the BIC's choice) splits a curved or skewed phase into
several overlapping Gaussians, and gives a small, distinct population (beam damage next to the
phase it came from) its own. Two components are one mode when the density of the pair along
their *ridgeline* (the curve through the points where the two log-densities' gradients are
parallel, which holds every mode and saddle of the pair; Ray and Lindsay 2005) does not dip much
between them: the ratio of its lowest point between the two peaks to the lower peak is above a
threshold (Hennig 2010, "Methods for merging Gaussian mixture components", the ridgeline ratio,
0.2 by default there). The modes are the connected groups of that relation.
"""

from __future__ import annotations

import numpy as np

RIDGE_POINTS = 101


def _log_density(x: np.ndarray, weight: float, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """log(weight * N(x; mean, cov)) for the rows of ``x``."""
    chol = np.linalg.cholesky(cov)
    z = np.linalg.solve(chol, (x - mean).T)
    log_det = 2 * np.log(np.diag(chol)).sum()
    return np.log(weight) - 0.5 * (len(mean) * np.log(2 * np.pi) + log_det + (z * z).sum(0))


def ridgeline_ratio(w1, m1, c1, w2, m2, c2, points: int = RIDGE_POINTS) -> float:
    """Lowest density between the two peaks over the lower peak, along the ridgeline of two
    weighted Gaussians; 1 when the pair has one peak there."""
    p1, p2 = np.linalg.inv(c1), np.linalg.inv(c2)
    alphas = np.linspace(0.0, 1.0, points)
    ridge = np.array([np.linalg.solve((1 - a) * p1 + a * p2, (1 - a) * p1 @ m1 + a * p2 @ m2)
                      for a in alphas])
    log_d = np.logaddexp(_log_density(ridge, w1, m1, c1), _log_density(ridge, w2, m2, c2))
    rising = np.diff(log_d)
    peaks = [i for i in range(points)
             if (i == 0 or rising[i - 1] >= 0) and (i == points - 1 or rising[i] <= 0)]
    if len(peaks) < 2:
        return 1.0
    first, last = peaks[0], peaks[-1]
    low = log_d[first:last + 1].min()
    return float(np.exp(low - min(log_d[first], log_d[last])))


def mode_groups(weights, means, covariances, ratio: float = 0.2) -> np.ndarray:
    """The mode (0, 1, ...) of each component: components whose pairwise ridgeline ratio is
    above ``ratio`` are joined, and so on transitively (single linkage)."""
    k = len(weights)
    parent = list(range(k))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(k):
        for j in range(i + 1, k):
            if root(i) != root(j) and ridgeline_ratio(weights[i], means[i], covariances[i],
                                                      weights[j], means[j],
                                                      covariances[j]) > ratio:
                parent[root(i)] = root(j)
    roots = sorted({root(i) for i in range(k)})
    return np.array([roots.index(root(i)) for i in range(k)])


def merged_gaussian(weights, means, covariances) -> tuple[float, np.ndarray, np.ndarray]:
    """One Gaussian with the weight, mean and covariance of a group of components."""
    w = np.asarray(weights, np.float64)
    total = w.sum()
    mean = (w[:, None] * means).sum(0) / total
    d = means - mean
    cov = (w[:, None, None] * (covariances + np.einsum("ki,kj->kij", d, d))).sum(0) / total
    return float(total), mean, cov
