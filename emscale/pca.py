"""PCA of (pixels x features) dask arrays, in scikit-learn estimator style.

Solver ``"gram"`` (exact, one pass): every navigation block contributes its pixel count, mean and
*centred* scatter matrix (float32 products, accumulated in float64); blocks are merged pairwise by
the parallel-variance formula (Chan et al.) in a dask tree reduction on the cluster, and the final
covariance is eigendecomposed on the client (features x features, small). Centring per block keeps
float32 products accurate where a raw ``X^T X`` would lose the variance under a large mean.
"""

from __future__ import annotations

import logging

import dask
import dask.array as da
import numpy as np

from emscale.errors import ConfigError

log = logging.getLogger(__name__)

SOLVERS = ("gram",)


def _scatter_block(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=np.float32)
    n, f = x.shape
    if n == 0:
        return {"n": 0, "mean": np.zeros(f), "m2": np.zeros((f, f))}
    mean = x.mean(axis=0, dtype=np.float64)
    centred = x - mean.astype(np.float32)
    return {"n": n, "mean": mean, "m2": (centred.T @ centred).astype(np.float64)}


def _merge(parts: list[dict]) -> dict:
    """Merge block statistics (Chan's parallel update of mean and centred scatter)."""
    out = parts[0]
    for p in parts[1:]:
        if p["n"] == 0:
            continue
        if out["n"] == 0:
            out = p
            continue
        n = out["n"] + p["n"]
        delta = p["mean"] - out["mean"]
        out = {
            "n": n,
            "mean": out["mean"] + delta * (p["n"] / n),
            "m2": out["m2"] + p["m2"] + np.outer(delta, delta) * (out["n"] * p["n"] / n),
        }
    return out


def scatter_statistics(x: da.Array, split_every: int = 8) -> dict:
    """Pixel count, mean and centred scatter matrix of ``x`` (pixels x features).

    One task per block, then a tree of merges ``split_every`` wide, all on the cluster; the loop
    below only builds the graph.
    """
    if x.ndim != 2:
        raise ValueError(f"expected a (pixels, features) array, got shape {x.shape}")
    if len(x.chunks[1]) > 1:
        x = x.rechunk({1: -1})
    parts = [dask.delayed(_scatter_block, pure=True)(b, dask_key_name=("pca-scatter", x.name, i))
             for i, b in enumerate(x.to_delayed().ravel())]
    level = 0
    while len(parts) > 1:
        level += 1
        parts = [dask.delayed(_merge, pure=True)(parts[i:i + split_every],
                                                 dask_key_name=("pca-merge", x.name, level, i))
                 for i in range(0, len(parts), split_every)]
    return parts[0].compute()


class PCA:
    """Principal component analysis of a (pixels x features) dask array.

    Parameters follow scikit-learn's ``PCA``; learned state ends in an underscore:
    ``components_`` (k x features), ``explained_variance_``, ``explained_variance_ratio_``,
    ``singular_values_``, ``mean_``, ``n_samples_``, ``noise_variance_``.
    """

    def __init__(self, n_components: int = 8, solver: str = "gram"):
        self.n_components = n_components
        self.solver = solver

    def _check(self, x) -> None:
        if self.solver not in SOLVERS:
            raise ConfigError(f"pca.solver: {self.solver!r} is not one of {SOLVERS}")
        if not (isinstance(self.n_components, (int, np.integer)) and self.n_components >= 1):
            raise ConfigError(f"pca.n_components: must be a positive integer, got {self.n_components!r}")
        if self.n_components > x.shape[1]:
            raise ConfigError(f"pca.n_components: {self.n_components} is more than the "
                              f"{x.shape[1]} features")

    def fit(self, x) -> "PCA":
        x = x if isinstance(x, da.Array) else da.from_array(np.asarray(x), chunks=(4096, -1))
        self._check(x)
        stats = scatter_statistics(x)
        n = stats["n"]
        if n < 2:
            raise ConfigError(f"pca: need at least 2 pixels, got {n}")
        cov = stats["m2"] / (n - 1)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
        k = self.n_components
        components = eigvec[:, :k].T
        # sign convention of scikit-learn's svd_flip (u-based is data dependent; use the largest
        # absolute loading of each component positive, which is deterministic)
        signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
        components *= signs[:, None]
        total = float(np.trace(cov))
        self.mean_ = stats["mean"].astype(np.float32)
        self.components_ = components.astype(np.float32)
        self.explained_variance_ = eigval[:k]
        self.explained_variance_ratio_ = eigval[:k] / total if total > 0 else np.zeros(k)
        self.singular_values_ = np.sqrt(eigval[:k] * (n - 1))
        self.noise_variance_ = float(eigval[k:].mean()) if k < len(eigval) else 0.0
        self.n_samples_ = int(n)
        self.n_features_in_ = int(x.shape[1])
        self.full_explained_variance_ratio_ = eigval / total if total > 0 else eigval * 0
        return self

    def transform(self, x):
        """Scores: ``(x - mean_) @ components_.T``, blockwise for dask input."""
        return _project(x, self.mean_, self.components_)

    def inverse_transform(self, scores):
        return scores @ self.components_ + self.mean_

    def fit_transform(self, x):
        return self.fit(x).transform(x)


def _project(x, mean, components):
    if isinstance(x, da.Array):
        return x.map_blocks(_project, mean, components, dtype=np.float32,
                            chunks=(x.chunks[0], (components.shape[0],)), name="pca-transform")
    return ((np.asarray(x, np.float32) - mean) @ components.T).astype(np.float32)
