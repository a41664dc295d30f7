"""The ``pca`` stage: PCA of (pixels x features) dask arrays, in scikit-learn estimator style.

Solvers:

- ``"gram"`` (exact, one pass, the default): every navigation block contributes its pixel count,
  mean and *centred* scatter matrix (float32 products, accumulated in float64); blocks are merged
  pairwise by the parallel-variance formula (Chan et al.) in a tree reduction on the cluster, and
  the covariance (features x features, small) is eigendecomposed on the client. Centring per block
  keeps float32 products accurate where a raw ``X^T X`` would lose the variance under a large mean.
  ``partial_fit`` merges one more batch into the running statistics: streaming and still exact.
- ``"randomized"``: dask's ``svd_compressed`` (Halko et al.) of the centred data, with power
  iterations; the input is re-read at each pass rather than held in memory. Several passes.
- ``"incremental"``: scikit-learn's ``IncrementalPCA.partial_fit`` over the blocks, one after the
  other, as a chain of tasks on the cluster (the model moves from task to task; the data stay put).
  Inherently serial: one core works.

All solvers skip pixels marked invalid (``valid=False``, from the preprocessing value policy).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import ClassVar, Literal, Optional

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from pydantic import Field
from sklearn.base import BaseEstimator

from emscale.config import Section, defaults_of
from emscale.errors import ConfigError
from emscale.reduction import reduce_blocks, tree_reduce
from emscale.stages.base import SIGNAL, Context, Output, Stage
from emscale.store import NAV_DIMS, feature_matrix

log = logging.getLogger(__name__)



class PCAConfig(Section):
    """The ``pca`` section (PCA is the baseline every run computes)."""

    name: ClassVar[str] = "pca"

    n_components: int = Field(16, ge=1, description=
        'principal components kept (the scree is plotted over them; at least train.latent_dim, '
        'which the autoencoder is compared with)')
    solver: Literal["gram", "randomized", "incremental"] = Field("gram", description=
        'exact Gram-matrix tree reduction, randomized SVD, or scikit-learn IncrementalPCA')
    error_k: Optional[int] = Field(None, ge=1, description=
        "components of the stage's own pca_recon_error map; null: the scree's elbow (the "
        "comparison with the autoencoder at its latent size is in encode)")
    n_power_iter: int = Field(4, ge=0, description='randomized: power iterations')
    batch_rows: Optional[int] = Field(None, ge=1, description=
        "incremental: rows per partial_fit; null: a navigation block's")


_DEFAULTS = defaults_of(PCAConfig)


# ---------------------------------------------------------------------------------------------
# exact one-pass statistics


def _scatter_block(x: np.ndarray, valid: np.ndarray | None = None) -> dict:
    x = np.asarray(x, dtype=np.float32)
    if valid is not None and not np.all(valid):
        x = x[np.asarray(valid).ravel()]
    n, f = x.shape
    if n == 0:
        return {"n": 0, "mean": np.zeros(f), "m2": np.zeros((f, f))}
    mean = x.mean(axis=0, dtype=np.float64)
    centred = x - mean.astype(np.float32)
    # the float32 product as it is (merges add in float64): half the bytes to move and hold
    return {"n": n, "mean": mean, "m2": centred.T @ centred}


def _scatter_group(*blocks, n_arrays: int) -> dict:
    """The statistics of a group of blocks (given array by array: x blocks, then valid blocks)
    as one block: one product of all their rows, no merges of feature x feature matrices. The
    blocks are centred straight into one array (no concatenated copy first)."""
    per = len(blocks) // n_arrays
    xs = [np.asarray(b, np.float32) for b in blocks[:per]]
    if n_arrays == 2:
        xs = [x if np.all(v) else x[np.asarray(v).ravel()] for x, v in zip(xs, blocks[per:])]
    if len(xs) == 1:
        return _scatter_block(xs[0])
    n = sum(len(x) for x in xs)
    if n == 0:
        return _scatter_block(xs[0])
    mean = sum(x.sum(axis=0, dtype=np.float64) for x in xs) / n
    centred = np.empty((n, xs[0].shape[1]), np.float32)
    start = 0
    for x in xs:
        np.subtract(x, mean.astype(np.float32), out=centred[start:start + len(x)])
        start += len(x)
    return {"n": n, "mean": mean, "m2": centred.T @ centred}


def merge_scatter(parts: list[dict]) -> dict:
    """Merge block statistics (Chan's parallel update of the mean and the centred scatter ``m2``:
    a features x features matrix, or only its diagonal, the per-feature sums of squares)."""
    out = parts[0]
    for p in parts[1:]:
        if p["n"] == 0:
            continue
        if out["n"] == 0:
            out = p
            continue
        n = out["n"] + p["n"]
        delta = p["mean"] - out["mean"]
        cross = np.outer(delta, delta) if np.ndim(out["m2"]) == 2 else delta**2
        m2 = cross * (out["n"] * p["n"] / n)  # float64: blocks' float32 products add into it
        m2 += out["m2"]
        m2 += p["m2"]
        out = {"n": n, "mean": out["mean"] + delta * (p["n"] / n), "m2": m2}
    return out


MERGE_BYTES = 256 << 20  # the scatter matrices one merge task may hold


def scatter_statistics(x: da.Array, valid: da.Array | None = None, split_every: int = 8,
                       compute: bool = False):
    """Delayed (or with ``compute``, computed window by window: ``reduce_blocks``) pixel count,
    mean and centred scatter matrix of ``x`` (pixels x features).

    With many features the float64 scatter matrix outweighs a block (4096 features: 134 MB per
    matrix against 16 MB of a block of 1024 patterns): each first-level task then takes up to 8
    blocks (one product of all their rows: merging 134 MB matrices costs ~0.15 s each), and merges
    take as many matrices as fit in ``MERGE_BYTES`` (the 4 GB 4D-STEM run had
    spilled them to disk: 2.9 GB per worker, 4.5 passes over the store)."""
    if x.ndim != 2:
        raise ValueError(f"expected a (pixels, features) array, got shape {x.shape}")
    if len(x.chunks[1]) > 1:
        x = x.rechunk({1: -1})
    arrays = (x,) if valid is None else (x, valid.rechunk((x.chunks[0],) + valid.chunks[1:]))
    f = x.shape[1]
    matrix = f * f * 8
    block = max(x.chunks[0]) * f * 4
    group = int(min(8, max(1, math.ceil(matrix / max(block, 1)))))
    split_every = int(max(2, min(split_every, MERGE_BYTES // matrix)))
    reduce = reduce_blocks if compute else tree_reduce
    return reduce(_scatter_block, merge_scatter, *arrays, name="pca-scatter",
                  split_every=split_every, group=group,
                  group_fn=functools.partial(_scatter_group, n_arrays=len(arrays)))


# ---------------------------------------------------------------------------------------------
# other solvers' passes


def _moments_block(x, valid=None):
    x = np.asarray(x, np.float32)
    if valid is not None:
        x = x[np.asarray(valid).ravel()]
    mean = x.mean(axis=0, dtype=np.float64) if len(x) else np.zeros(x.shape[1])
    c = x - mean.astype(np.float32)
    return {"n": len(x), "mean": mean, "m2": np.einsum("ij,ij->j", c, c, dtype=np.float64)}


def _centre_rows(x, valid, mean):
    c = np.asarray(x, np.float32) - mean
    if valid is not None:
        c[~np.asarray(valid).ravel()] = 0  # an invalid pixel adds nothing to the centred data
    return c


class BlockGraph:
    """One block of a dask array as its own small task graph, computed where it is used (an
    opaque object: dask does not look inside it, so the block is not a dependency)."""

    def __init__(self, graph: dict, key):
        self.graph, self.key = graph, key

    def compute(self):
        return dask.get(self.graph, self.key)


def _block_graphs(a: da.Array) -> list[BlockGraph]:
    from dask.core import flatten
    from dask.optimization import cull

    full = dict(a.__dask_graph__())  # materialised once; culled per block below
    return [BlockGraph(cull(full, [key])[0], key) for key in flatten(a.__dask_keys__())]


def _incremental_step(state, x, valid=None, *, n_components, batch_rows):
    """One link of the incremental chain: partial_fit on whole batches, carry the remainder."""
    from sklearn.decomposition import IncrementalPCA

    model, carry = state if state is not None else (IncrementalPCA(n_components=n_components), None)
    x = np.asarray(x.compute() if isinstance(x, BlockGraph) else x, np.float32)
    if valid is not None:
        valid = valid.compute() if isinstance(valid, BlockGraph) else valid
        x = x[np.asarray(valid).ravel()]
    if carry is not None:
        x = np.concatenate([carry, x])
    while len(x) >= 2 * batch_rows:  # keep at least one batch back so the remainder can join it
        model.partial_fit(x[:batch_rows])
        x = x[batch_rows:]
    return model, x


def _incremental_finish(state, *, n_components):
    model, carry = state
    seen = getattr(model, "n_samples_seen_", 0) + (0 if carry is None else len(carry))
    if seen < 2:
        raise ConfigError(f"pca: need at least 2 valid pixels, got {seen}")
    if carry is not None and len(carry):
        if len(carry) < n_components and not hasattr(model, "components_"):
            raise ConfigError(f"pca.n_components: {n_components} is more than the "
                              f"{len(carry)} valid pixels")
        model.partial_fit(carry)
    return model


# ---------------------------------------------------------------------------------------------
# the estimator


class PCA(BaseEstimator):
    """Principal component analysis of a (pixels x features) dask array.

    Parameters follow scikit-learn's ``PCA``; learned state ends in an underscore:
    ``components_`` (k x features), ``explained_variance_``, ``explained_variance_ratio_``,
    ``singular_values_``, ``mean_``, ``n_samples_``, ``noise_variance_``, and
    ``scree_`` (the explained-variance ratios of every component the solver knows: all of them
    for ``gram``, ``n_components`` otherwise) with ``suggested_k_`` (the scree's elbow).
    """

    def __init__(self, n_components: int = _DEFAULTS["n_components"],
                 solver: str = _DEFAULTS["solver"], n_power_iter: int = _DEFAULTS["n_power_iter"],
                 batch_rows: int | None = _DEFAULTS["batch_rows"], seed: int = 0):
        self.n_components = n_components
        self.solver = solver
        self.n_power_iter = n_power_iter
        self.batch_rows = batch_rows
        self.seed = seed

    def _check(self, x) -> None:
        PCAConfig.of("pca", n_components=self.n_components, solver=self.solver,
                     n_power_iter=self.n_power_iter, batch_rows=self.batch_rows)
        if self.n_components > x.shape[1]:
            raise ConfigError(f"pca.n_components: {self.n_components} is more than the "
                              f"{x.shape[1]} features")
        if self.batch_rows is not None and self.batch_rows < self.n_components:
            raise ConfigError(f"pca.batch_rows: must be at least n_components "
                              f"({self.n_components}), got {self.batch_rows!r}")

    def fit(self, x, valid=None) -> "PCA":
        """Fit on ``x`` (pixels x features, dask or numpy); ``valid`` (pixels,) bool skips pixels."""
        x = _as_dask(x)
        if x.ndim != 2:
            raise ValueError(f"expected a (pixels, features) array, got shape {x.shape}")
        x = x.rechunk({1: -1}) if len(x.chunks[1]) > 1 else x
        if valid is not None:
            valid = _as_dask(valid, x.chunks[0]).ravel().astype(bool).rechunk((x.chunks[0],))
        self._check(x)
        fit = {"gram": self._fit_gram, "randomized": self._fit_randomized,
               "incremental": self._fit_incremental}[self.solver]
        fit(x, valid)
        self.n_features_in_ = int(x.shape[1])
        self.suggested_k_ = scree_elbow(self.scree_)
        return self

    def partial_fit(self, x, valid=None) -> "PCA":
        """Merge one more batch (gram: exact running statistics; incremental: scikit-learn's)."""
        x = np.asarray(x, np.float32)
        self._check(x)
        if self.solver == "gram":
            stats = _scatter_block(x, valid)
            self._stats = merge_scatter([self._stats, stats]) if hasattr(self, "_stats") else stats
            self._from_scatter(self._stats)
        elif self.solver == "incremental":
            from sklearn.decomposition import IncrementalPCA

            model = getattr(self, "_ipca", None) or IncrementalPCA(n_components=self.n_components)
            self._ipca = model.partial_fit(x if valid is None else x[np.asarray(valid).ravel()])
            self._from_sklearn(model)
        else:
            raise ConfigError("pca.solver: 'randomized' has no partial_fit; use 'gram' or 'incremental'")
        self.n_features_in_ = int(x.shape[1])
        self.suggested_k_ = scree_elbow(self.scree_)
        return self

    # -- solvers --

    def _fit_gram(self, x, valid) -> None:
        self._stats = scatter_statistics(x, valid, compute=True)
        self._from_scatter(self._stats)

    def _from_scatter(self, stats) -> None:
        n = stats["n"]
        if n < 2:
            raise ConfigError(f"pca: need at least 2 valid pixels, got {n}")
        cov = np.asarray(stats["m2"], np.float64) / (n - 1)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        k = self.n_components
        # only the k vectors kept are copied (a 4096 x 4096 reordering is 134 MB on the client)
        eigval, components = np.clip(eigval[order], 0.0, None), eigvec[:, order[:k]].T
        del eigvec
        total = float(np.trace(cov))
        rank = min(n, len(eigval))  # scikit-learn's noise variance averages the rest of the rank
        self._set(mean=stats["mean"], components=components, variance=eigval[:k],
                  total=total, n=n, noise=float(eigval[k:rank].mean()) if k < rank else 0.0,
                  scree=eigval / total if total > 0 else eigval * 0)

    def _fit_randomized(self, x, valid) -> None:
        args = (x,) if valid is None else (x, valid)
        moments = reduce_blocks(_moments_block, merge_scatter, *args, name="pca-moments")
        n, mean = moments["n"], moments["mean"].astype(np.float32)
        if n < 2:
            raise ConfigError(f"pca: need at least 2 valid pixels, got {n}")
        if valid is None:
            centred = x.map_blocks(_centre_rows, None, mean, dtype=np.float32, token="pca-centre")
        else:
            centred = da.map_blocks(_centre_rows, x, valid[:, None], mean, dtype=np.float32,
                                    token="pca-centre")
        k = self.n_components
        # QR between power iterations: plain powers of float32 data overflow
        _, s, vt = da.linalg.svd_compressed(centred, k, n_power_iter=self.n_power_iter,
                                            iterator="QR", seed=self.seed, compute=True)
        s, vt = dask.compute(s, vt)
        total = float(moments["m2"].sum() / (n - 1))
        var = s**2 / (n - 1)
        rank = min(n, x.shape[1])
        self._set(mean=moments["mean"], components=vt, variance=var, total=total, n=n,
                  noise=(total - var.sum()) / (rank - k) if k < rank else 0.0,
                  scree=var / total if total > 0 else var * 0)

    def _fit_incremental(self, x, valid) -> None:
        batch = self.batch_rows or max(self.n_components, int(np.median(x.chunks[0])))
        step = functools.partial(_incremental_step, n_components=self.n_components, batch_rows=batch)
        # each link computes its own block when it runs (the block's small task graph travels
        # with it), so no block is read ahead of the serial chain and held in memory
        xs = _block_graphs(x)
        vs = [None] * len(xs) if valid is None else _block_graphs(valid)
        token = tokenize(x, valid, self.n_components, batch)
        state = None
        for i, (xb, vb) in enumerate(zip(xs, vs)):  # builds a chain of tasks; nothing runs here
            state = dask.delayed(step, pure=True)(state, xb, vb,
                                                  dask_key_name=("pca-incremental", token, i))
        model = dask.delayed(functools.partial(_incremental_finish, n_components=self.n_components),
                             pure=True)(state).compute()
        self._ipca = model
        self._from_sklearn(model)

    def _from_sklearn(self, model) -> None:
        total = float(model.var_.sum() * model.n_samples_seen_ / max(model.n_samples_seen_ - 1, 1))
        var = model.explained_variance_
        n, k = int(model.n_samples_seen_), len(var)
        rank = min(n, model.components_.shape[1])
        # computed like the other solvers (scikit-learn's incremental value is biased low)
        self._set(mean=model.mean_, components=model.components_, variance=var, total=total,
                  n=n, noise=(total - var.sum()) / (rank - k) if k < rank else 0.0,
                  scree=var / total if total > 0 else var * 0)

    def _set(self, *, mean, components, variance, total, n, noise, scree) -> None:
        components = np.array(components, dtype=np.float64)
        k = components.shape[0]
        # deterministic signs: the largest absolute loading of each component is positive
        signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
        components *= signs[:, None]
        self.mean_ = np.asarray(mean, np.float32)
        self.components_ = components.astype(np.float32)
        self.explained_variance_ = np.asarray(variance, np.float64)
        self.explained_variance_ratio_ = self.explained_variance_ / total if total > 0 else 0 * variance
        self.singular_values_ = np.sqrt(self.explained_variance_ * (n - 1))
        self.noise_variance_ = float(noise)
        self.n_samples_ = int(n)
        self.total_variance_ = total
        self.scree_ = np.asarray(scree, np.float64)

    # -- use --

    def transform(self, x):
        """Scores: ``(x - mean_) @ components_.T``, blockwise for dask input."""
        return _project(x, self.mean_, self.components_)

    def inverse_transform(self, scores):
        return scores @ self.components_ + self.mean_

    def fit_transform(self, x, valid=None):
        return self.fit(x, valid).transform(x)

    def score_and_error(self, x, k: int | None = None):
        """Scores (pixels x n_components) and the reconstruction error per pixel at ``k``
        components (mean squared residual over features), blockwise, in one pass."""
        k = self.n_components if k is None else k
        if not 1 <= k <= self.n_components:
            raise ConfigError(f"pca.error_k: must be within 1..{self.n_components}, got {k}")
        x = _as_dask(x)
        x = x.rechunk({1: -1}) if len(x.chunks[1]) > 1 else x
        both = x.map_blocks(_score_block, self.mean_, self.components_, k, dtype=np.float32,
                            chunks=(x.chunks[0], (self.n_components + 1,)), token="pca-score")
        return both[:, :-1], both[:, -1]


def _as_dask(x, row_chunks=None):
    if isinstance(x, da.Array):
        return x
    x = np.asarray(x)
    return da.from_array(x, chunks=(row_chunks or 4096,) + tuple((n,) for n in x.shape[1:]))


def _project(x, mean, components):
    if isinstance(x, da.Array):
        x = x.rechunk({1: -1}) if len(x.chunks[1]) > 1 else x
        return x.map_blocks(_project, mean, components, dtype=np.float32,
                            chunks=(x.chunks[0], (components.shape[0],)), token="pca-transform")
    return ((np.asarray(x, np.float32) - mean) @ components.T).astype(np.float32)


SLAB_BYTES = 2 << 20  # rows scored at a time: their temporaries stay in the core's cache


def _score_block(x, mean, components, k):
    """Scores and the mean squared residual at ``k`` components, a slab of rows at a time (the
    centred rows and their residual never leave the cache: 19 ms per 14 823 x 896 block against
    46 for whole-block temporaries)."""
    x = np.asarray(x, np.float32)
    n, f = x.shape
    out = np.empty((n, len(components) + 1), np.float32)
    rows = max(64, SLAB_BYTES // (4 * max(f, 1)))
    for i in range(0, n, rows):
        c = x[i:i + rows] - mean
        scores = c @ components.T
        c -= scores[:, :k] @ components[:k]
        out[i:i + rows, :-1] = scores
        out[i:i + rows, -1] = np.einsum("ij,ij->i", c, c) / f
    return out


SCREE_SEARCH = 64


def scree_elbow(ratios: np.ndarray, search: int = SCREE_SEARCH) -> int:
    """The number of components before the scree's elbow.

    The elbow is the point of the log-scree (its first ``search`` components) that lies furthest
    below the chord from the first to the last of them (the "kneedle" rule on a log scale, where
    noise components form a nearly flat floor); the components before it are the signal. The
    search is limited because the far tail of a Poisson scree (weak channels) falls again and
    would drag the chord: on the synthetic EELS scan the first 20-100 components all give 7,
    which is where the eigenvalue gaps end, the whole 1024 give 12.
    """
    r = np.asarray(ratios, np.float64)[:search]
    r = r[r > 0]
    if len(r) < 3:
        return max(1, len(r))
    return max(1, kneedle(np.log10(r)))


def kneedle(y: np.ndarray) -> int:
    """The index of the point of a decreasing convex curve furthest below its end-to-end chord."""
    y = np.asarray(y, np.float64)
    if len(y) < 3:
        return 0
    t = np.arange(len(y))
    chord = y[0] + (y[-1] - y[0]) * t / (len(y) - 1)
    return int(np.argmax(chord - y))


# ---------------------------------------------------------------------------------------------
# the stage


def pca_stage(features: xr.Dataset, pca: PCA, error_k: int | None = None) -> xr.Dataset:
    """Fit ``pca`` (unless fitted) on a preprocess stage's ``features``, skipping invalid pixels,
    and return the PCA stage Dataset with DESIGN.md's names: components, explained variance
    (ratio), the scree, and lazy per-pixel scores and reconstruction error at ``error_k``
    components (default: the scree's elbow). Pixels marked invalid get NaN scores and errors."""
    feats = features["features"]
    sig_dims = feats.dims[2:]
    if not hasattr(pca, "components_"):
        valid = feature_matrix(features["valid"])[:, 0].astype(bool) if "valid" in features else None
        pca.fit(feature_matrix(feats), valid)
    k = min(pca.suggested_k_, pca.n_components) if error_k is None else error_k
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= pca.n_components):
        raise ConfigError(f"pca.error_k: must be an integer within 1..{pca.n_components}, got {k!r}")
    scores, err = _score_scan(feats.data, pca, k)
    if "valid" in features:  # an invalid pixel has no scores: NaN, not numbers from zeroed data
        valid = features["valid"].data
        scores = da.where(valid[..., None], scores, np.float32(np.nan))
        err = da.where(valid, err, np.float32(np.nan))
    sig_shape = tuple(feats.sizes[d] for d in sig_dims)
    coords = {d: features[d] for d in (*NAV_DIMS, *sig_dims) if d in features.coords}
    ncomp = pca.n_components
    return xr.Dataset(
        {
            "pca_components": (("component", *sig_dims), pca.components_.reshape(ncomp, *sig_shape)),
            "pca_mean": (sig_dims, pca.mean_.reshape(sig_shape)),
            "pca_explained_variance": (("component",), pca.explained_variance_),
            "pca_explained_variance_ratio": (("component",), pca.explained_variance_ratio_),
            "pca_scree": (("rank",), pca.scree_),
            "pca_scores": ((*NAV_DIMS, "component"), scores),
            "pca_recon_error": (NAV_DIMS, err),
        },
        coords={**coords, "component": np.arange(ncomp)},
        attrs={"pca": {"solver": pca.solver, "n_components": int(ncomp),
                       "suggested_k": int(pca.suggested_k_), "error_k": int(k),
                       "n_samples": int(pca.n_samples_), "noise_variance": pca.noise_variance_,
                       "total_variance": pca.total_variance_}},
    )


def _score_scan(data: da.Array, pca: PCA, k: int) -> tuple[da.Array, da.Array]:
    """Scores (y, x, component) and error (y, x) of a (y, x, *signal) array, one task per block."""
    n_sig = data.ndim - 2
    both = data.map_blocks(_score_nav_block, pca.mean_, pca.components_, k, dtype=np.float32,
                           drop_axis=list(range(3, data.ndim)) if n_sig > 1 else [],
                           chunks=(*data.chunks[:2], (pca.n_components + 1,)), token="pca-score")
    return both[..., :-1], both[..., -1]


def _score_nav_block(block, mean, components, k):
    flat = np.asarray(block, np.float32).reshape(block.shape[0] * block.shape[1], -1)
    return _score_block(flat, mean, components, k).reshape(block.shape[0], block.shape[1], -1)


def write_pca_stage(results, features: xr.Dataset, pca: PCA, *, error_k: int | None = None,
                    overwrite: bool = False, progress: bool = False) -> xr.Dataset:
    """Fit ``pca`` on the ``preprocess`` stage's features and write the ``pca`` stage group of
    ``results`` (a ``ResultsStore``): the fit is one pass, the scores and errors a second."""
    return results.write_stage("pca", pca_stage(features, pca, error_k), overwrite=overwrite,
                               progress=progress)


def _build(ctx: Context) -> xr.Dataset:
    cfg = ctx.config
    pca = PCA(cfg.n_components, cfg.solver, cfg.n_power_iter, cfg.batch_rows, seed=ctx.seed)
    return pca_stage(ctx.input("preprocess"), pca, cfg.error_k)


STAGE = Stage(
    name="pca", config=PCAConfig, reads=("preprocess",), build=_build, library=PCA,
    not_in_library={"error_k": "pca_stage(features, pca, error_k)"},
    about="exact PCA of the features (the baseline): axes, scree, scores and error per pixel",
    outputs={
        "pca_components": Output(("component", SIGNAL), "principal axes (unit vectors)"),
        "pca_mean": Output((SIGNAL,), "mean of the valid pixels' features"),
        "pca_explained_variance": Output(("component",), "variance along each axis"),
        "pca_explained_variance_ratio": Output(("component",), "share of the total variance"),
        "pca_scree": Output(("rank",), "explained-variance ratio of every component the solver "
                            "knows (all of them for gram)"),
        "pca_scores": Output((*NAV_DIMS, "component"), "scores per pixel (NaN: invalid)"),
        "pca_recon_error": Output(NAV_DIMS, "mean squared residual at error_k components"),
    },
    attrs={"pca": "solver, n_components, suggested_k (the scree's elbow), error_k, n_samples, "
                  "noise_variance, total_variance"},
)
