"""The ``cluster`` stage: phase clustering of compressed codes (autoencoder latents or PCA
scores), on the Dask cluster.

``PhaseClustering`` is an estimator over a (pixels, d) dask array of codes:
- **K sweep** on a seeded, uniform sample of valid pixels (``sample_size``): for each K, k-means
  (k-means++ seeding, ``n_init`` restarts, the lowest inertia kept) gives the inertia (the elbow)
  and the silhouette (on ``silhouette_size`` sampled pixels); a full-covariance Gaussian mixture
  gives the BIC; one task per K on the cluster. The chosen K (``k_choice``: elbow by default for
  k-means, bic for GMM, or silhouette) and the three curves go into ``k_table_``.
- **Structure test**: with no phase structure (the best silhouette under ``min_silhouette``, or
  one Gaussian's BIC below every K's: a uniform specimen's noise) K is 1, said in
  ``structure_`` and ``warnings_``. A K at the top of ``k_range``, a K that only its own criterion
  picks, and phases under ``min_phase_fraction`` of the pixels are warnings too (logged; in the
  stage's attrs and the report).
- **Islands**: a distinct minor population that the chosen K put inside a bigger phase (a
  separate mode of the sample's density, ``emscale.mixture_modes``) becomes a phase of its own
  (``islands``), and the centres are refined again on all pixels.
- **Final fit** at that K: the best sample fit is refined on *all* pixels by full-data Lloyd
  (k-means) or EM (GMM) iterations, each one tree reduction over the blocks, until the centres
  move less than ``tol`` (relative to the data spread) or ``max_iter``.
- ``predict`` / ``predict_proba`` are blockwise.

``phase_stage`` turns it into DESIGN.md's variables: ``phase``, ``phase_probability`` (GMM),
``phase_fraction``, ``phase_mean_signal`` (exact over all pixels, a blockwise reduction over the
features), the decoded centroids and the K-choice curves.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal, Optional

import dask
import dask.array as da
import numpy as np
import xarray as xr
from pydantic import Field, model_validator
from sklearn.base import BaseEstimator

from emscale.config import Section, defaults_of
from emscale.errors import ConfigError
from emscale.reduction import WINDOW_BLOCKS, reduce_blocks, sum_parts, tree_reduce
from emscale.stages.base import SIGNAL, Context, Output, Stage
from emscale.stages.pca import kneedle
from emscale.store import NAV_DIMS, feature_matrix, finite_rows, map_on_blocks

log = logging.getLogger(__name__)


class ClusterConfig(Section):
    """The ``cluster`` section: phases from the latent codes (and, for comparison, from the PCA
    scores at the same k)."""

    name: ClassVar[str] = "cluster"

    method: Literal["kmeans", "gmm"] = Field("kmeans", description=
        'k-means, or a Gaussian mixture (with phase probabilities)')
    n_clusters: int | Literal["auto"] = Field("auto", description=
        'number of phases, or auto: chosen over k_range')
    k_range: tuple[int, int] = Field((2, 8), description='smallest and largest K tried')
    k_choice: Optional[Literal["silhouette", "bic", "elbow"]] = Field(None, description=
        'how K is chosen; null: elbow for kmeans, BIC for gmm')
    n_init: int = Field(10, ge=1, description='restarts per K in the sweep (lowest inertia kept)')
    max_iter: int = Field(50, ge=1, description='full-data Lloyd/EM iterations')
    tol: float = Field(1e-4, gt=0, description=
        'stop the full-data iterations when the centres move less than this (relative to the '
        "data's spread)")
    sample_size: int = Field(50_000, ge=10,
        description='pixels of the seeded sample the K sweep runs on')
    silhouette_size: int = Field(5_000, ge=10,
        description='pixels of the sample the silhouette is computed on')
    min_silhouette: float = Field(0.25, ge=0, le=1, description=
        'n_clusters auto: below this best silhouette over k_range (in the codes, or in the '
        'PCA scores of the same pixels) there is no phase structure and K = 1 (Kaufman and '
        'Rousseeuw: under 0.25, no substantial structure); 0: never')
    min_phase_fraction: float = Field(0.01, ge=0, lt=1, description=
        'a phase with a smaller share of the labelled pixels is reported as minor (a warning)')
    islands: bool = Field(True, description=
        "n_clusters auto: a distinct minor population (a separate mode of the codes' density "
        "in the sweep's BIC-best Gaussian mixture, at most island_share of the sample when that "
        "is not 0) that the chosen K put inside a bigger phase becomes a phase of its own")
    island_share: float = Field(0.05, ge=0, lt=0.5, description=
        "n_clusters auto, islands: a separate mode of the codes' density with at most this share "
        'of the sampled pixels (contamination, beam damage, a precipitate) is a phase of its own '
        'from the start, and K is chosen on the other pixels (small populations bend the '
        "inertia's elbow and take phases that the big ones need); 0: only the split after K")
    ridge_ratio: float = Field(0.2, gt=0, lt=1, description=
        'two mixture components are one mode when their density along the ridgeline between '
        'them stays above this share of the lower peak (Hennig 2010)')

    @model_validator(mode="after")
    def _consistent(self):
        lo, hi = self.k_range
        if not 2 <= lo <= hi:
            raise ValueError(f"k_range: must be two integers 2 <= lo <= hi, got {list(self.k_range)}")
        if self.n_clusters != "auto" and self.n_clusters < 1:
            raise ValueError(f"n_clusters: must be 'auto' or a positive integer, got {self.n_clusters}")
        return self


_DEFAULTS = defaults_of(ClusterConfig)


# ---------------------------------------------------------------------------------------------
# block functions (module level: they travel to the workers)


def _valid_rows(x, valid):
    x = np.asarray(x, np.float64)
    keep = finite_rows(x)
    if valid is not None:
        keep &= np.asarray(valid, bool).ravel()
    return x, keep


def _sample_block(x, valid, *others, fraction, seed, block_seed):
    """The sampled rows of ``x`` (and, with ``others``, the same rows of each of them)."""
    x, keep = _valid_rows(x, valid)
    others = [np.asarray(o, np.float64) for o in others]
    for o in others:
        keep &= finite_rows(o)
    rng = np.random.default_rng([seed, block_seed])
    pick = keep & (rng.random(len(x)) < fraction)
    return (x[pick], *(o[pick] for o in others)) if others else x[pick]


def _lloyd_block(x, valid=None, *, centres):
    x, keep = _valid_rows(x, valid)
    if not keep.all():
        x = x[keep]
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one small GEMM, no (pixels, K, d) temporary
    # (~4x faster on 4-d codes); float64, so the expansion loses nothing that matters here
    d2 = x @ (-2 * centres.T)
    d2 += (centres * centres).sum(axis=1)
    lab = d2.argmin(1)
    k = len(centres)
    # per-cluster sums by weighted bincount: np.add.at is unbuffered (~20x slower per row)
    sums = np.stack([np.bincount(lab, weights=x[:, j], minlength=k) for j in range(x.shape[1])],
                    axis=1).reshape(centres.shape)
    nearest = np.einsum("ij,ij->i", x, x) + d2[np.arange(len(x)), lab]
    return {"sums": sums, "counts": np.bincount(lab, minlength=k).astype(np.float64),
            "inertia": float(np.maximum(nearest, 0).sum())}


def _em_block(x, valid=None, *, gmm):
    x, keep = _valid_rows(x, valid)
    x = x[keep]
    k, d = gmm.means_.shape
    if not len(x):
        return {"nk": np.zeros(k), "sx": np.zeros((k, d)), "sxx": np.zeros((k, d, d)), "loglik": 0.0}
    log_prob = gmm._estimate_weighted_log_prob(x)
    top = log_prob.max(axis=1, keepdims=True)
    r = np.exp(log_prob - top)
    total = r.sum(axis=1, keepdims=True)
    r /= total
    norm = top[:, 0] + np.log(total[:, 0])  # log-sum-exp, sharing the exponentials with r
    # the responsibility-weighted second moments as one GEMM ((k d) x pixels x d): a plain
    # einsum "nk,ni,nj->kij" loops in C without BLAS, ~3x slower per EM pass
    sxx = ((r[:, :, None] * x[:, None, :]).reshape(len(x), k * d).T @ x).reshape(k, d, d)
    return {"nk": r.sum(0), "sx": r.T @ x, "sxx": sxx, "loglik": float(norm.sum())}


def _predict_block(x, valid, *, model, proba):
    x = np.asarray(x, np.float64)
    keep = finite_rows(x)
    if valid is not None:
        keep &= np.asarray(valid, bool).ravel()
    k = model.n_clusters_
    if proba:
        out = np.full((len(x), k), np.nan, np.float32)
        if keep.any():
            out[keep] = model._proba_rows(x[keep])
        return out
    if keep.all():  # the usual block: no gather, no scatter
        return model._predict_rows(x).astype(np.int32)
    out = np.full(len(x), -1, np.int32)
    if keep.any():
        out[keep] = model._predict_rows(x[keep])
    return out


def _count_block(labels, *, k):
    lab = np.asarray(labels).ravel()
    return np.bincount(lab[lab >= 0], minlength=k)


_SUM_ROWS = 2048  # rows of a block summed at a time by the class sums
_PARTIAL_ROWS = 128  # rows summed in float32 before a float64 addition


def _sum64(rows: np.ndarray) -> np.ndarray:
    """The column sums of ``rows`` in float64: float32 partial sums of ``_PARTIAL_ROWS`` rows
    added in float64. Their rounding (5e-8 of the sum, a block of 15 816 x 1024 random values)
    is under the float32 mean's own; numpy's float64 accumulation of float32 rows converts
    every value: 8.5 against 2.5 ms on that block."""
    if rows.dtype == np.float64:
        return rows.sum(axis=0)
    total = np.zeros(rows.shape[1])
    for start in range(0, len(rows), _PARTIAL_ROWS):
        total += rows[start:start + _PARTIAL_ROWS].sum(axis=0)
    return total


def _class_sums_blocks(x, *labels, ks):
    """Per-class sums (float64) and counts of the rows of ``x`` for each labelling of
    ``labels`` (class ids in [0, k), -1: none), rows with a non-finite value left out. Each row
    is gathered and summed once whatever the number of labellings: by its joint class (the
    tuple of its classes), whose sums then add up to each labelling's (the cluster stage's three
    labellings took 3x one labelling's time)."""
    x = np.asarray(x)
    labs = [np.asarray(lab).ravel() for lab in labels]
    joint = np.zeros(len(x), np.int64)
    for lab, k in zip(labs, ks):  # mixed radix: digit lab + 1 in [0, k]
        joint = joint * (k + 1) + (lab + 1)
    joint[~finite_rows(x)] = 0  # 0: no class in any labelling
    out = [{"sums": np.zeros((k, x.shape[1])), "counts": np.zeros(k)} for k in ks]
    counts = np.bincount(joint)
    totals = {int(code): np.zeros(x.shape[1]) for code in np.flatnonzero(counts[1:]) + 1}
    # summed by joint class, _SUM_ROWS rows at a time: the rows sorted by class in one gather
    # (it stays in cache), then each class's run summed; a chunk of one class without a gather.
    # No np.add.at (unbuffered, ~4x the block's read+chain time on 280 channels). A block of
    # 16 joint classes in runs of ~17 rows: 14.7 -> 9.4 ms; the 16 GB EELS run's phase-mean
    # tasks (reading and the chain included): 10.4-10.9 -> 10.0-10.7 CPU-s
    for start in range(0, len(x), _SUM_ROWS):
        codes, rows = joint[start:start + _SUM_ROWS], x[start:start + _SUM_ROWS]
        if codes[0] == codes[-1] and (codes == codes[0]).all():
            if codes[0]:
                totals[int(codes[0])] += _sum64(rows)
            continue
        order = np.argsort(codes, kind="stable")
        codes, rows = codes[order], rows[order]
        edges = np.flatnonzero(np.diff(codes)) + 1
        for a, b in zip((0, *edges), (*edges, len(codes))):
            if codes[a]:
                totals[int(codes[a])] += _sum64(rows[a:b])
    for code, total in totals.items():
        rest = code
        for part, k in zip(reversed(out), reversed(ks)):
            rest, digit = divmod(rest, k + 1)
            if digit:
                part["sums"][digit - 1] += total
                part["counts"][digit - 1] += counts[code]
    return out


def _sum_each(parts):
    return [sum_parts([p[i] for p in parts]) for i in range(len(parts[0]))]


def _kmeans_silhouette(sample, k, sil_idx, *, n_init, seed):
    """k-means at K on the sample, and its silhouette on the ``sil_idx`` pixels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    km = KMeans(k, init="k-means++", n_init=n_init, random_state=seed).fit(sample)
    labels = km.labels_[sil_idx]
    silhouette = (float(silhouette_score(sample[sil_idx], labels))
                  if len(np.unique(labels)) > 1 else float("nan"))
    return km, silhouette


def _sweep_one(sample, k, sil_idx, *, n_init, seed) -> dict:
    """One K of the sweep: k-means inertia and silhouette, GMM BIC."""
    from sklearn.mixture import GaussianMixture

    km, silhouette = _kmeans_silhouette(sample, k, sil_idx, n_init=n_init, seed=seed)
    gm = GaussianMixture(k, covariance_type="full", n_init=max(1, n_init // 3),
                         random_state=seed, reg_covar=1e-6).fit(sample)
    return {"inertia": float(km.inertia_), "silhouette": silhouette, "bic": float(gm.bic(sample)),
            "models": (km, gm)}


def _silhouette_one(sample, k, sil_idx, *, n_init, seed) -> float:
    return _kmeans_silhouette(sample, k, sil_idx, n_init=n_init, seed=seed)[1]


def _bic_one(sample, k, *, seed) -> float:
    from sklearn.mixture import GaussianMixture

    return float(GaussianMixture(k, covariance_type="full", n_init=1, random_state=seed,
                                 reg_covar=1e-6).fit(sample).bic(sample))


# ---------------------------------------------------------------------------------------------
# the estimator


class PhaseClustering(BaseEstimator):
    def __init__(self, method: str = _DEFAULTS["method"],
                 n_clusters: int | str = _DEFAULTS["n_clusters"],
                 k_range: tuple[int, int] = _DEFAULTS["k_range"],
                 k_choice: str | None = _DEFAULTS["k_choice"], n_init: int = _DEFAULTS["n_init"],
                 max_iter: int = _DEFAULTS["max_iter"], tol: float = _DEFAULTS["tol"],
                 sample_size: int = _DEFAULTS["sample_size"],
                 silhouette_size: int = _DEFAULTS["silhouette_size"],
                 min_silhouette: float = _DEFAULTS["min_silhouette"],
                 min_phase_fraction: float = _DEFAULTS["min_phase_fraction"],
                 islands: bool = _DEFAULTS["islands"],
                 island_share: float = _DEFAULTS["island_share"],
                 ridge_ratio: float = _DEFAULTS["ridge_ratio"], seed: int = 0):
        self.method = method
        self.n_clusters = n_clusters
        self.k_range = k_range
        self.k_choice = k_choice
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.sample_size = sample_size
        self.silhouette_size = silhouette_size
        self.min_silhouette = min_silhouette
        self.min_phase_fraction = min_phase_fraction
        self.islands = islands
        self.island_share = island_share
        self.ridge_ratio = ridge_ratio
        self.seed = seed

    def _check(self) -> None:
        ClusterConfig.of("cluster", **{k: v for k, v in self.get_params().items() if k != "seed"})

    # -- sample and sweep ----------------------------------------------------------------------

    def _sample(self, x: da.Array, valid: da.Array | None, *others: da.Array):
        """A seeded uniform sample of about ``sample_size`` valid pixels (collected: it is small).
        With ``others`` (arrays on ``x``'s blocks: the PCA scores), the same pixels of each of
        them too, in the same pass: a list of samples."""
        n = x.shape[0]
        fraction = min(1.0, self.sample_size / max(n, 1))
        # unfused, as reduction._block_lists says why
        blocks = x.to_delayed(optimize_graph=False).ravel()
        vblocks = (valid.to_delayed(optimize_graph=False).ravel() if valid is not None
                   else [None] * len(blocks))
        oblocks = [o.to_delayed(optimize_graph=False).ravel() for o in others]
        parts = [dask.delayed(partial(_sample_block, fraction=fraction, seed=self.seed,
                                      block_seed=i), pure=True)(b, v, *(o[i] for o in oblocks))
                 for i, (b, v) in enumerate(zip(blocks, vblocks))]
        parts = [p if others else (p,) for start in range(0, len(parts), WINDOW_BLOCKS)
                 for p in dask.compute(*parts[start:start + WINDOW_BLOCKS])]
        samples = [np.concatenate(arrays) for arrays in zip(*parts)]
        if len(samples[0]) > self.sample_size:
            keep = np.random.default_rng(self.seed).permutation(len(samples[0]))[:self.sample_size]
            samples = [s[keep] for s in samples]
        return samples if others else samples[0]

    def _sweep(self, sample: np.ndarray, light: np.ndarray | None = None
               ) -> tuple[dict, dict, dict | None]:
        """Inertia, silhouette and BIC per K of ``k_range`` on the sample, and the sample fits
        per K (k-means, GMM): one task per K on the cluster (the client only sends the sample
        once and collects the table). With ``light`` (the PCA scores' sample), its
        ``_light_sweep`` table too, from the same compute: its tasks run where the longer K's
        leave workers idle."""
        lo, hi = self.k_range
        ks = list(range(lo, min(hi, len(sample) - 1) + 1))
        if not ks:
            raise ConfigError(f"cluster: {len(sample)} valid pixel(s) cannot be clustered")
        rng = np.random.default_rng(self.seed)
        sil_idx = rng.permutation(len(sample))[:self.silhouette_size]
        shared = dask.delayed(sample, pure=True)
        rows, light_table = dask.compute(
            [dask.delayed(_sweep_one, pure=True)(shared, k, sil_idx, n_init=self.n_init,
                                                 seed=self.seed) for k in ks],
            None if light is None else self._light_sweep(light))
        table = {"k": ks, "inertia": [], "silhouette": [], "bic": []}
        for row in rows:
            for name in ("inertia", "silhouette", "bic"):
                table[name].append(row[name])
        return table, {k: row["models"] for k, row in zip(ks, rows)}, light_table

    @staticmethod
    def _criteria(table: dict) -> dict[str, int]:
        """The K each criterion picks: the elbow of the inertia, the best silhouette, the lowest
        BIC."""
        ks, sil = table["k"], np.asarray(table["silhouette"], np.float64)
        out = {"elbow": ks[kneedle(np.asarray(table["inertia"]))],
               "bic": ks[int(np.argmin(table["bic"]))]}
        if np.isfinite(sil).any():
            out["silhouette"] = ks[int(np.nanargmax(sil))]
        return out

    def _choose(self, table: dict) -> tuple[int, str]:
        # k-means: the elbow of the inertia. The silhouette is kept beside it but it prefers too
        # few clusters when mixed pixels bridge phases (3 instead of 4 on the 1024 x 512 bench
        # scan: 0.595 against 0.575)
        choice = self.k_choice or ("bic" if self.method == "gmm" else "elbow")
        return self._criteria(table)[choice], choice

    def _structure(self, table: dict, sample: np.ndarray) -> dict:
        """Whether the sample has phase structure at all. It has none when the best silhouette over
        the sweep is under ``min_silhouette`` (0.17 on the codes and the PCA scores of a uniform
        specimen's Poisson noise here; 0.45-0.76 on the synthetic EELS and 4D-STEM scans) or
        when one Gaussian has a lower BIC than every K of the sweep (the PCA scores of noise
        are Gaussian; an autoencoder's codes of noise need not be, hence the silhouette)."""
        from sklearn.mixture import GaussianMixture

        one = GaussianMixture(1, covariance_type="full", reg_covar=1e-6).fit(sample)
        bic1 = float(one.bic(sample))
        sil = np.asarray(table["silhouette"], np.float64)
        best = float(np.nanmax(sil)) if np.isfinite(sil).any() else None
        reasons = []
        if best is not None and best < self.min_silhouette:
            reasons.append(f"the best silhouette over k_range is {best:.3f} "
                           f"(under cluster.min_silhouette {self.min_silhouette:g})")
        if bic1 <= min(table["bic"]):
            reasons.append("one Gaussian has a lower BIC than every K of k_range")
        return {"phase_structure": not reasons, "reasons": reasons, "best_silhouette": best,
                "bic_k1": bic1}

    def _light_sweep(self, sample: np.ndarray) -> dict:
        """The structure test's part of a sweep, on the PCA scores: the k-means silhouette and
        the Gaussian mixture's BIC over ``k_range`` (one task per K, as ``_sweep``; the table's
        entries delayed: ``_sweep`` computes them). Every K's BIC, as the codes' sweep has, so
        that "one Gaussian is lower than every K" means it."""
        lo, hi = self.k_range
        ks = list(range(lo, min(hi, len(sample) - 1) + 1))
        sil_idx = np.random.default_rng(self.seed).permutation(len(sample))[:self.silhouette_size]
        shared = dask.delayed(sample, pure=True)
        n_init = min(self.n_init, 3)
        sil = [dask.delayed(_silhouette_one, pure=True)(shared, k, sil_idx, n_init=n_init,
                                                        seed=self.seed) for k in ks]
        bic = [dask.delayed(_bic_one, pure=True)(shared, k, seed=self.seed) for k in ks]
        return {"k": ks, "silhouette": sil, "bic": bic}

    def _warn(self, message: str) -> None:
        log.warning("cluster: %s", message)
        self.warnings_.append(message)

    def _check_choice(self, k: int, chosen_by: str) -> None:
        """Warnings on an automatic K: at an edge of ``k_range``, or chosen by one criterion
        that no other supports."""
        lo, hi = self.k_range
        if k == hi and hi > lo:
            self._warn(f"K = {k} is the top of k_range [{lo}, {hi}]: there may be more phases "
                       "(widen cluster.k_range)")
        if k == lo and lo > 2 and hi > lo:
            self._warn(f"K = {k} is the bottom of k_range [{lo}, {hi}]: fewer phases were not "
                       "tried")
        picks = self._criteria(self.k_table_)
        others = {c: v for c, v in picks.items() if c != chosen_by}
        if others and k not in others.values():
            said = ", ".join(f"{c} K = {v}" for c, v in picks.items())
            self._warn(f"the criteria disagree ({said}); K = {k} by {chosen_by} "
                       "(cluster.k_choice chooses the criterion)")

    # -- fit -----------------------------------------------------------------------------------

    def fit(self, x: da.Array, valid: da.Array | None = None, *,
            pca_scores: da.Array | None = None, sample: np.ndarray | None = None,
            order: bool = True) -> "PhaseClustering":
        """Choose K (unless fixed) and fit on the codes ``x`` (pixels, d), skipping invalid
        pixels. ``pca_scores``: the PCA scores of the same pixels (on ``x``'s blocks), whose
        lack of phase structure also means K = 1: a linear projection of noise is
        Gaussian, an autoencoder's codes of it need not be (a briefly trained one's codes of a
        uniform specimen had a silhouette of 0.37 here, its PCA scores 0.17); their sample is
        then kept as ``pca_scores_sample_``. ``sample``: this clustering's sample of ``x``
        already drawn (the same seed, sample size and valid pixels: a PCA-scores clustering
        given the codes' ``pca_scores_sample_``), instead of a pass over ``x``. ``order``: number
        the clusters by decreasing size, counted in a pass over ``x``; False leaves that to
        ``_number_by_size`` with counts from a later pass (the cluster stage's phase means)."""
        from sklearn.cluster import KMeans
        from sklearn.mixture import GaussianMixture

        self._check()
        x = x if isinstance(x, da.Array) else da.from_array(np.asarray(x), chunks=(65536, -1))
        if valid is not None:
            valid = valid if isinstance(valid, da.Array) else da.from_array(np.asarray(valid))
            valid = valid.reshape(-1).rechunk((x.chunks[0],))
        other = None
        if sample is None and pca_scores is not None and self.n_clusters == "auto":
            # the same pixels of both, in one pass (their light sweep runs even where the
            # codes show no structure and it is not looked at: a few seconds on noise)
            sample, other = self._sample(x, valid, pca_scores)
            self.pca_scores_sample_ = other
        elif sample is None:
            sample = self._sample(x, valid)
        if len(sample) < 3:
            raise ConfigError(f"cluster: only {len(sample)} valid pixel(s) sampled; nothing to cluster")
        self.sample_size_ = len(sample)
        self.warnings_: list[str] = []
        self.structure_ = None
        self.modes_, self.islands_, minor, self._mode_of_sample = None, 0, [], None
        chosen, sample_fits, chosen_fits = sample, {}, {}
        if self.n_clusters == "auto":
            # (the final fit starts from the chosen K's sample fit: no refit)
            if other is not None:
                # in units of their spread: the mixtures' reg_covar (1e-6) is absolute, and
                # the scores of unit-sum spectra vary by 1e-7..1e-5, so every mixture looked
                # like one Gaussian (a BIC lower by 5000 at K = 4 became higher by 196); a
                # scaling per axis shifts every K's BIC alike
                other = other / np.where(other.std(axis=0) > 0, other.std(axis=0), 1.0)
            self.k_table_, sample_fits, other_table = self._sweep(sample, light=other)
            self.structure_ = self._structure(self.k_table_, sample)
            if other is not None and self.structure_["phase_structure"]:
                other_structure = self._structure(other_table, other)
                self.structure_["pca_scores"] = other_structure
                if not other_structure["phase_structure"]:
                    self.structure_["phase_structure"] = False
                    self.structure_["reasons"] = [f"in the PCA scores, {r}"
                                                  for r in other_structure["reasons"]]
            chosen_fits = sample_fits
            if self.structure_["phase_structure"] and self.islands and self.island_share > 0:
                minor = self._minor_modes(sample, sample_fits)
            if minor:  # K for the big phases is chosen without the small populations
                chosen = sample[~np.isin(self._mode_of_sample, minor)]
                self.k_table_, chosen_fits, _ = self._sweep(chosen)
                self.structure_["without_minor"] = self._structure(self.k_table_, chosen)
            k, self.k_chosen_by_ = self._choose(self.k_table_)
            if not self.structure_["phase_structure"]:
                k, self.k_chosen_by_ = 1, "no phase structure"
                self._warn("no phase structure: " + "; ".join(self.structure_["reasons"])
                           + ". K = 1 (set cluster.n_clusters to force phases)")
            elif minor and not self.structure_["without_minor"]["phase_structure"]:
                k, self.k_chosen_by_ = 1, "one phase besides the minor populations"
                self._warn("no phase structure besides the minor populations: "
                           + "; ".join(self.structure_["without_minor"]["reasons"]))
            else:
                self._check_choice(k, self.k_chosen_by_)
        else:
            self.k_table_, k, self.k_chosen_by_ = None, int(self.n_clusters), "fixed"
        spread = float(np.sqrt(sample.var(axis=0).sum())) or 1.0
        fitted = chosen_fits.get(k)
        if fitted is None:
            fitted = (KMeans(k, init="k-means++", n_init=self.n_init,
                             random_state=self.seed).fit(chosen) if self.method == "kmeans"
                      else None,
                      GaussianMixture(k, covariance_type="full", n_init=max(1, self.n_init // 3),
                                      random_state=self.seed, reg_covar=1e-6).fit(chosen)
                      if self.method == "gmm" else None)
        self.n_clusters_ = k + len(minor)
        self.minor_populations_ = len(minor)
        if self.method == "kmeans":
            centres, _ = self._with_modes(sample, minor, centres=fitted[0].cluster_centers_)
            self._lloyd(x, valid, centres.astype(np.float64), spread)
        else:
            self._em(x, valid, self._with_modes(sample, minor, gm=fitted[1])[1])
        if self.n_clusters == "auto" and self.islands and self.structure_["phase_structure"]:
            if self._split_islands(sample, sample_fits):  # then refine all centres again
                if self.method == "kmeans":
                    self._lloyd(x, valid, self.cluster_centers_, spread)
                else:
                    self._em(x, valid, self.gmm_)
        if order:
            self._order_clusters(x, valid)
        return self

    def _lloyd(self, x, valid, centres, spread) -> None:
        """Full-data Lloyd iterations from ``centres`` until they move by less than ``tol``."""
        for it in range(self.max_iter):
            stats = reduce_blocks(partial(_lloyd_block, centres=centres), sum_parts,
                                  x, *([valid] if valid is not None else []), name="kmeans-lloyd")
            counts = stats["counts"]
            new = np.where(counts[:, None] > 0, stats["sums"] / np.maximum(counts, 1)[:, None],
                           centres)
            shift = float(np.sqrt(((new - centres) ** 2).sum(1)).max()) / spread
            centres = new
            # the inertia of the last assignment pass (the centres moved by < tol after it)
            self.inertia_, self.n_iter_ = stats["inertia"], it + 1
            if shift < self.tol:
                break
        self.cluster_centers_ = centres

    def _em(self, x, valid, gm) -> None:
        """Full-data EM iterations of ``gm`` until the log-likelihood gains less than ``tol``
        per pixel."""
        prev, n = -np.inf, 1
        for it in range(self.max_iter):
            stats = reduce_blocks(partial(_em_block, gmm=gm), sum_parts,
                                  x, *([valid] if valid is not None else []), name="gmm-em")
            n = stats["nk"].sum()
            self.log_likelihood_, self.n_iter_ = stats["loglik"], it + 1
            _m_step(gm, stats)
            if abs(stats["loglik"] - prev) < self.tol * max(n, 1):
                break
            prev = stats["loglik"]
        self.gmm_ = gm
        self.cluster_centers_ = gm.means_
        k, d = gm.means_.shape
        n_params = k * d + k * d * (d + 1) / 2 + k - 1
        self.bic_ = float(-2 * self.log_likelihood_ + n_params * math.log(max(n, 1)))

    def _modes(self, sample: np.ndarray, sample_fits: dict):
        """The modes of the sample's density (once per fit): the sweep's BIC-best Gaussian
        mixture, the mode of each of its components, and the mode of each sampled pixel."""
        from emscale.mixture_modes import mode_groups

        if getattr(self, "_mode_of_sample", None) is None or len(self._mode_of_sample) != len(sample):
            bics = [sample_fits[k][1].bic(sample) for k in sorted(sample_fits)]
            gm_bic = sample_fits[sorted(sample_fits)[int(np.argmin(bics))]][1]
            groups = mode_groups(gm_bic.weights_, gm_bic.means_, gm_bic.covariances_,
                                 self.ridge_ratio)
            self._mode_fit = gm_bic, groups
            self._mode_of_sample = groups[gm_bic.predict(sample)]
            self.modes_ = int(groups.max()) + 1
        return (*self._mode_fit, self._mode_of_sample)

    def _minor_modes(self, sample: np.ndarray, sample_fits: dict) -> list[int]:
        """The modes of the density holding at most ``island_share`` of the sample (and enough
        pixels to be a population, not a few outliers): each becomes a phase of its own."""
        _, _, mode = self._modes(sample, sample_fits)
        if self.modes_ < 2:
            return []
        shares = np.bincount(mode, minlength=self.modes_) / len(sample)
        minor = [g for g in range(self.modes_)
                 if max(20 / len(sample), 0.001) <= shares[g] <= self.island_share]
        if not (shares > self.island_share).any():
            return []  # nothing big to choose K on
        for g in minor:
            self._warn(f"a distinct minor population of {shares[g]:.1%} of the sampled pixels "
                       "(a separate mode of the codes' density) is a phase of its own; K was "
                       "chosen on the other pixels (cluster.island_share)")
        self.islands_ = len(minor)
        return minor

    def _with_modes(self, sample: np.ndarray, groups: list[int], centres=None, gm=None):
        """Centres (k-means) and/or a Gaussian mixture with one more cluster per mode of
        ``groups``: the mean of its sampled pixels, its components merged into one Gaussian."""
        from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

        from emscale.mixture_modes import merged_gaussian

        if not groups:
            return centres, gm
        gm_bic, comp_mode, mode = self._modes(sample, {})
        if centres is not None:
            centres = np.vstack([centres] + [sample[mode == g].mean(0) for g in groups])
        if gm is not None:
            parts = [merged_gaussian(gm_bic.weights_[comp_mode == g], gm_bic.means_[comp_mode == g],
                                     gm_bic.covariances_[comp_mode == g]) for g in groups]
            w_new = np.array([p[0] for p in parts])
            gm.weights_ = np.concatenate([gm.weights_ * (1 - w_new.sum()), w_new])
            gm.means_ = np.vstack([gm.means_, [p[1] for p in parts]])
            gm.covariances_ = np.concatenate([gm.covariances_, [p[2] for p in parts]])
            gm.precisions_cholesky_ = _compute_precision_cholesky(gm.covariances_, "full")
            gm.n_components = len(gm.weights_)
        return centres, gm

    def _split_islands(self, sample: np.ndarray, sample_fits: dict) -> int:
        """Give each distinct minor population its own phase: a mode of the sample's density
        (``mixture_modes`` on the Gaussian mixture the BIC chose in the sweep) that sits mostly
        inside one phase, is less than half of it and holds at most ``island_share`` of the
        sample (when that is not 0) was merged into it (the elbow counts the big phases: a small,
        well separated one barely lowers the inertia). Returns how many."""
        _, _, mode = self._modes(sample, sample_fits)
        if self.modes_ < 2:
            return 0
        phase = self._predict_rows(sample.astype(np.float64))
        sizes = np.bincount(phase, minlength=self.n_clusters_)
        islands = []
        for g in range(self.modes_):
            members = mode == g
            n_g = int(members.sum())
            if n_g < max(20, 0.001 * len(sample)):
                continue
            host = int(np.bincount(phase[members], minlength=self.n_clusters_).argmax())
            # small, as the populations split out before K (a bigger mode inside a phase was,
            # on 4D-STEM scans, its thicker grains: 12 % of the pixels, one phase all the same)
            small = n_g <= self.island_share * len(sample) if self.island_share > 0 else True
            if small and (phase[members] == host).mean() > 0.5 and n_g < 0.5 * sizes[host]:
                islands.append(g)
                self._warn(f"a distinct population of {n_g / len(sample):.1%} of the sampled "
                           "pixels (a separate mode of the codes' density) was inside a bigger "
                           "phase: it is a phase of its own (cluster.islands)")
        if not islands:
            return 0
        if self.method == "kmeans":
            self.cluster_centers_, _ = self._with_modes(sample, islands, centres=self.cluster_centers_)
        else:
            _, self.gmm_ = self._with_modes(sample, islands, gm=self.gmm_)
            self.cluster_centers_ = self.gmm_.means_
        self.islands_ += len(islands)
        self.n_clusters_ += len(islands)
        return len(islands)

    def _order_clusters(self, x, valid) -> None:
        """Number the clusters by decreasing size (a stable, readable numbering)."""
        labels = self.predict(x, valid)
        self._number_by_size(reduce_blocks(partial(_count_block, k=self.n_clusters_), sum_parts,
                                           labels, name="phase-count"))

    def _number_by_size(self, counts: np.ndarray) -> np.ndarray:
        """Renumber the clusters by decreasing ``counts`` (pixels per cluster as numbered now);
        returns the order (new cluster j is old ``order[j]``)."""
        counts = np.asarray(counts)
        order = np.argsort(-counts, kind="stable")
        self.cluster_centers_ = self.cluster_centers_[order]
        if self.method == "gmm":
            gm = self.gmm_
            gm.weights_ = gm.weights_[order]
            gm.means_ = gm.means_[order]
            gm.covariances_ = gm.covariances_[order]
            gm.precisions_cholesky_ = gm.precisions_cholesky_[order]
            self.cluster_centers_ = gm.means_
        self.counts_ = counts[order]
        total = max(int(self.counts_.sum()), 1)
        self.minor_phases_ = [j for j, c in enumerate(self.counts_)
                              if self.n_clusters_ > 1 and c / total < self.min_phase_fraction]
        for j, c in enumerate(self.counts_):
            if j in self.minor_phases_:
                self._warn(f"phase {j} holds {c / total:.2%} of the labelled pixels (under "
                           f"cluster.min_phase_fraction {self.min_phase_fraction:g}): a minor "
                           "phase or a cluster of anomalies, see its mean signal")
        return order

    # -- predict -------------------------------------------------------------------------------

    def _predict_rows(self, x: np.ndarray) -> np.ndarray:
        if self.method == "gmm":
            return self.gmm_.predict(x)
        # argmin of |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every centre
        c = self.cluster_centers_
        return ((c * c).sum(axis=1) - 2 * (x @ c.T)).argmin(axis=1)

    def _proba_rows(self, x: np.ndarray) -> np.ndarray:
        return self.gmm_.predict_proba(x).astype(np.float32)

    def predict(self, x: da.Array, valid: da.Array | None = None) -> da.Array:
        """Cluster ids per pixel (-1 for invalid pixels), blockwise."""
        return self._blockwise(x, valid, proba=False)

    def predict_proba(self, x: da.Array, valid: da.Array | None = None) -> da.Array:
        """GMM responsibilities per pixel (NaN for invalid pixels), blockwise."""
        if self.method != "gmm":
            raise ConfigError("cluster.method: probabilities need method 'gmm'")
        return self._blockwise(x, valid, proba=True)

    def _blockwise(self, x, valid, proba):
        fn = partial(_predict_block, model=self, proba=proba)
        x = x if isinstance(x, da.Array) else da.from_array(np.asarray(x), chunks=(65536, -1))
        if valid is None:
            valid = da.ones(x.shape[0], bool, chunks=(x.chunks[0],))
        chunks = (x.chunks[0], (self.n_clusters_,)) if proba else (x.chunks[0],)
        return da.map_blocks(fn, x, valid[:, None], dtype=np.float32 if proba else np.int32,
                             chunks=chunks, drop_axis=None if proba else 1,
                             token="phase-proba" if proba else "phase-predict")

    def summary(self) -> dict:
        out = {"method": self.method, "n_clusters": int(self.n_clusters_),
               "chosen_by": self.k_chosen_by_, "n_iter": int(self.n_iter_),
               "sample_size": int(self.sample_size_), "counts": [int(c) for c in self.counts_]}
        if self.method == "kmeans":
            out["inertia"] = float(self.inertia_)
        else:
            out["bic"] = self.bic_
        if self.structure_ is not None:
            out["structure"] = self.structure_
        if getattr(self, "modes_", None) is not None:
            out["modes"], out["islands"] = int(self.modes_), int(self.islands_)
            out["minor_populations"] = int(self.minor_populations_)
        out["minor_phases"] = [int(j) for j in getattr(self, "minor_phases_", [])]
        out["warnings"] = list(getattr(self, "warnings_", []))
        return out


def _m_step(gm, stats) -> None:
    """Update a fitted scikit-learn GaussianMixture from full-data sufficient statistics."""
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

    nk = stats["nk"] + 10 * np.finfo(float).eps
    means = stats["sx"] / nk[:, None]
    cov = stats["sxx"] / nk[:, None, None] - np.einsum("ki,kj->kij", means, means)
    cov += gm.reg_covar * np.eye(means.shape[1])[None]
    gm.weights_ = nk / nk.sum()
    gm.means_ = means
    gm.covariances_ = cov
    gm.precisions_cholesky_ = _compute_precision_cholesky(cov, "full")


# ---------------------------------------------------------------------------------------------
# the stage


def phase_stage(codes: xr.DataArray, features: xr.Dataset, clustering: PhaseClustering, *,
                spec=None, prefix: str = "", exclude: xr.DataArray | None = None) -> xr.Dataset:
    """See ``_phase_parts``: the phase variables of one clustering."""
    finish, labelled = _phase_parts(codes, features, clustering, spec=spec, prefix=prefix,
                                    exclude=exclude)
    return finish(phase_means(features, [labelled])[0])


def _keep_block(block, directory: str, stored: str, block_info=None):
    """``block`` (a block of flat labels, or of GMM probabilities), also saved as ``stored``
    (int8 labels: K < 128) in ``directory/I.npy`` (I: its place along the pixels), atomically
    (a block recomputed on another worker writes the same bytes)."""
    i = block_info[0]["chunk-location"][0]
    tmp = os.path.join(directory, f"{i}.npy.{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        np.save(f, block.astype(stored, copy=False))
    os.replace(tmp, os.path.join(directory, f"{i}.npy"))
    return block


def _kept_labels(directory: str, order: np.ndarray, proba: bool, block_info=None):
    """A kept block as the written labels: renumbered (new cluster j is old ``order[j]``), or
    from kept GMM probabilities, their most likely cluster (-1 where NaN: an invalid pixel)."""
    kept = np.load(os.path.join(directory, f"{block_info[None]['chunk-location'][0]}.npy"))
    if proba:
        kept = _labels_of_proba(kept)
    lookup = np.empty(len(order) + 1, np.int32)
    lookup[np.asarray(order)] = np.arange(len(order))
    lookup[-1] = -1
    return lookup[kept].astype(np.int32)  # (-1 indexes the last entry: stays -1)


def _kept_proba(directory: str, order: np.ndarray, block_info=None):
    kept = np.load(os.path.join(directory, f"{block_info[None]['chunk-location'][0]}.npy"))
    return np.ascontiguousarray(kept[:, np.asarray(order)])


def _labels_of_proba(proba):
    return np.where(np.isnan(proba[:, 0]), -1, np.nan_to_num(proba).argmax(axis=1)) \
        .astype(np.int32)


def _phase_parts(codes: xr.DataArray, features: xr.Dataset, clustering: PhaseClustering, *,
                 spec=None, prefix: str = "", exclude: xr.DataArray | None = None,
                 pca_scores: xr.DataArray | None = None, sample: np.ndarray | None = None,
                 keep: Path | None = None):
    """Fit ``clustering`` (unless fitted) on ``codes`` (y, x, d) and return the phase variables
    (names prefixed with ``prefix``, e.g. ``pca_`` for the PCA comparison): ``phase`` (y, x; -1
    invalid), ``phase_probability`` (GMM), ``phase_fraction``, ``phase_mean_signal`` (cluster,
    feature...), ``phase_centroid`` (cluster, d) and, with the model ``spec``,
    ``phase_centroid_signal`` (the decoded centroids), plus the K-choice curves. Pixels where
    ``exclude`` (e.g. the ``anomaly`` map) are left out of the fit, so that anomalies neither
    pull the centres nor count as a phase in the choice of K; every pixel with finite codes is
    labelled (invalid pixels have NaN codes: -1).

    ``sample``: ``PhaseClustering.fit``'s. ``keep``: a directory (on storage every worker
    sees) where the phase-means pass keeps the labels it predicts (a byte or two a pixel; GMM:
    its probabilities), which the write then reads back: every pixel's labels are computed
    once. Without it, the write predicts them again.

    Returns ``finish(stats)`` and the lazy labels (flat, on the features' blocks) with K, from
    which ``phase_means`` makes its ``stats`` (several clusterings share one pass)."""
    flat = feature_matrix(codes)
    # the maps on the codes' blocks (each group is read in blocks of its own size)
    on_codes = dict(zip(NAV_DIMS, codes.chunks[:2])) if codes.chunks else {}
    # a pixel is clustered where its code is finite: the encode and pca stages give invalid
    # pixels NaN codes (and the codes' own blocks need no map of another group rechunked)
    valid = da.isfinite(flat).all(axis=1)
    fitted_here = not hasattr(clustering, "n_clusters_")
    if fitted_here:
        fit_mask = valid
        if exclude is not None:
            kept_in = ~feature_matrix(exclude.astype(bool).chunk(on_codes))[:, 0].astype(bool)
            fit_mask = kept_in if valid is None else (valid & kept_in)
        other = None
        if pca_scores is not None:
            other = feature_matrix(pca_scores.chunk(on_codes) if on_codes else pca_scores)
        # numbered by size from the phase means' counts (no pass of its own to count)
        clustering.fit(flat, fit_mask, pca_scores=other, sample=sample, order=False)
    k = clustering.n_clusters_
    gmm = clustering.method == "gmm"
    if keep is not None:
        shutil.rmtree(keep, ignore_errors=True)  # (another run's)
        keep.mkdir(parents=True)
        # GMM: the probabilities (the labels are their most likely cluster), kept for the write
        kept = clustering.predict_proba(flat, valid) if gmm else clustering.predict(flat, valid)
        stored = "float32" if gmm else ("int8" if k < 128 else "int32")
        kept = kept.map_blocks(_keep_block, str(keep), stored, dtype=kept.dtype)
        labels_flat = kept.map_blocks(_labels_of_proba, dtype=np.int32, drop_axis=1) \
            if gmm else kept
    else:
        labels_flat = clustering.predict(flat, valid)
    labels = _unflatten(labels_flat, codes.data)
    # the phase means: one pass over the features, the labels split to their blocks
    labels_flat_on_features = map_on_blocks(labels, features["features"])
    return partial(_phase_variables, codes=codes, features=features, clustering=clustering,
                   labels=labels, flat=flat, valid=valid, spec=spec, prefix=prefix,
                   renumber=fitted_here, keep=keep), \
        (labels_flat_on_features, k)


def phase_means(features: xr.Dataset, labelled) -> list[dict]:
    """Per-phase sums and counts of the features for each ``(flat labels, k)`` of ``labelled``,
    in ONE pass: each block of features feeds a single task that sums it for every labelling
    (two reductions sharing the blocks would hold them all until both had read them)."""
    return list(_phase_means(features, labelled, reduce_blocks))


def lazy_phase_means(features: xr.Dataset, labelled):
    """``phase_means``, as a delayed reduction."""
    return _phase_means(features, labelled, tree_reduce)


def _phase_means(features, labelled, reduce):
    ks = tuple(k for _, k in labelled)
    return reduce(partial(_class_sums_blocks, ks=ks), _sum_each,
                  feature_matrix(features["features"]), *[lab for lab, _ in labelled],
                  name="phase-mean")


def _phase_variables(stats, *, codes, features, clustering, labels, flat, valid, spec, prefix,
                     renumber, keep=None):
    k = clustering.n_clusters_
    gmm = clustering.method == "gmm"
    order, proba = np.arange(k), None
    if renumber:  # by decreasing size: the sums, the model, and so the labels written
        order = clustering._number_by_size(stats["counts"])
        stats = {"sums": stats["sums"][order], "counts": stats["counts"][order]}
        if keep is None:
            labels = _unflatten(clustering.predict(flat, valid), codes.data)
    if keep is not None:  # the labels the phase-means pass kept, renumbered
        labels = _unflatten(da.map_blocks(_kept_labels, str(keep), order, gmm,
                                          chunks=(flat.chunks[0],), dtype=np.int32,
                                          meta=np.empty(0, np.int32)), codes.data)
        if gmm:
            proba = da.map_blocks(_kept_proba, str(keep), order, dtype=np.float32,
                                  chunks=(flat.chunks[0], (k,)), meta=np.empty((0, 0), np.float32))
    feats = features["features"]
    sig_dims = feats.dims[2:]
    counts = stats["counts"]
    mean_signal = (stats["sums"] / np.maximum(counts, 1)[:, None]).astype(np.float32)
    mean_signal[counts == 0] = np.nan
    sig_shape = tuple(feats.shape[2:])
    p = prefix
    variables = {
        f"{p}phase": (NAV_DIMS, labels, {"long_name": "phase id (-1: invalid pixel)"}),
        f"{p}phase_fraction": (("cluster",), (counts / max(counts.sum(), 1)).astype(np.float64)),
        f"{p}phase_mean_signal": (("cluster", *sig_dims), mean_signal.reshape(k, *sig_shape)),
        f"{p}phase_centroid": (("cluster", codes.dims[-1]), clustering.cluster_centers_.astype(np.float32)),
    }
    if gmm:
        proba = clustering.predict_proba(flat, valid) if proba is None else proba
        variables[f"{p}phase_probability"] = ((*NAV_DIMS, "cluster"), _unflatten(proba, codes.data))
    if spec is not None:
        variables[f"{p}phase_centroid_signal"] = (("cluster", *sig_dims),
                                                  spec.decode(clustering.cluster_centers_)
                                                  .reshape(k, *sig_shape))
    coords = {d: features[d] for d in (*NAV_DIMS, *sig_dims) if d in features.coords}
    ds = xr.Dataset(variables, coords={**coords, "cluster": np.arange(k)})
    if clustering.k_table_ is not None:
        t = clustering.k_table_
        ds = ds.assign_coords({f"{p}k_candidate": t["k"]})
        for name in ("inertia", "silhouette", "bic"):
            ds[f"{p}k_{name}"] = ((f"{p}k_candidate",), np.asarray(t[name], np.float64))
    ds.attrs[f"{p}phase"] = clustering.summary()
    return ds


def _unflatten(flat: da.Array, like: da.Array) -> da.Array:
    """(pixels[, c]) in ``feature_matrix``'s block order → (y, x[, c]) on ``like``'s nav blocks."""
    ny_chunks, nx_chunks = like.chunks[:2]
    blocks = iter(flat.blocks[i] for i in range(flat.numblocks[0]))
    rows = [da.concatenate([next(blocks).reshape(by, bx, *flat.shape[1:]) for bx in nx_chunks],
                           axis=1) for by in ny_chunks]
    return da.concatenate(rows, axis=0)


def phase_dataset(encoded: xr.Dataset, features: xr.Dataset, clustering: PhaseClustering, *,
                  spec=None, pca: xr.Dataset | None = None,
                  pca_clustering: PhaseClustering | None = None,
                  exclude: xr.DataArray | None = None, keep: Path | None = None) -> xr.Dataset:
    """The ``cluster`` stage: phases of the latent codes and, with the ``pca`` stage, of the PCA
    scores at the same k (``pca_phase`` ...) for comparison; pixels where ``exclude`` (the
    anomaly map) are left out of both fits. ``keep``: a directory for the labels between the
    phase-means pass and the write (``_phase_parts``)."""
    latent, scores = encoded["latent"], None
    if pca is not None:
        from emscale.stages.encode import latent_dim

        # on the codes' blocks: both phase maps then share one write task per block, and the
        # group reads back without misaligned chunks
        scores = pca["pca_scores"].isel(component=slice(0, latent_dim(encoded)))
        if latent.chunks:
            scores = scores.chunk(dict(zip(NAV_DIMS, latent.chunks[:2])))
    # the PCA scores also say whether there is phase structure at all
    fitted_here = not hasattr(clustering, "n_clusters_")  # (not fitted on another scan)
    parts = [_phase_parts(latent, features, clustering, spec=spec, exclude=exclude,
                          pca_scores=scores, keep=None if keep is None else keep / "latent")]
    if pca is not None:
        pc = pca_clustering or clustering.__class__(**{**clustering.get_params(), "n_clusters":
                                                       clustering.n_clusters_})
        # on the pixels the codes' clustering sampled here (its seed, sample size and mask):
        # no second pass
        same = fitted_here and pca_clustering is None
        parts.append(_phase_parts(scores, features, pc, prefix="pca_", exclude=exclude,
                                  sample=getattr(clustering, "pca_scores_sample_", None)
                                  if same else None,
                                  keep=None if keep is None else keep / "pca"))
    labellings = [p[1] for p in parts]
    if exclude is not None:  # the flagged pixels' mean signal, in the same pass
        flags = map_on_blocks(exclude.astype(np.int32) - 1, features["features"])
        labellings.append((flags, 1))  # 0: flagged
    # both clusterings' phase means (and the anomalies') in one pass over the features
    stats = phase_means(features, labellings)
    ds, *rest = [finish(st) for (finish, _), st in zip(parts, stats)]
    for other in rest:
        ds = ds.merge(other, compat="override")
        ds.attrs.update(other.attrs)  # (merge keeps the first dataset's attrs only)
    if exclude is not None:
        flagged = stats[-1]
        n = int(flagged["counts"][0])
        mean = (flagged["sums"][0] / max(n, 1)).astype(np.float32)
        if n == 0:
            mean[:] = np.nan
        sig_dims = features["features"].dims[2:]
        ds["anomaly_mean_signal"] = (sig_dims, mean.reshape(features["features"].shape[2:]),
                                     {"pixels": n})
    return ds


def write_phase_stage(results, encoded: xr.Dataset, features: xr.Dataset,
                      clustering: PhaseClustering, *, overwrite: bool = False,
                      progress: bool = False, **kwargs) -> xr.Dataset:
    """``phase_dataset`` written as the ``cluster`` group of ``results`` (the labels kept
    between its two passes in a temporary directory beside the store)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=".cluster-labels-",
                                     dir=Path(results.path).parent) as keep:
        kwargs.setdefault("keep", Path(keep))
        return results.write_stage("cluster", phase_dataset(encoded, features, clustering,
                                                            **kwargs),
                                   overwrite=overwrite, progress=progress)


def _build(ctx: Context) -> xr.Dataset:
    from emscale.model_spec import ModelSpec

    features, encoded = ctx.input("preprocess"), ctx.input("encode")
    spec = ModelSpec.from_train_stage(ctx.input("train"), tuple(features["features"].shape[2:]))
    clustering = PhaseClustering(**ctx.config.model_dump(), seed=ctx.seed)
    # the labels between the phase means and the write: next to the run's checkpoints
    keep = None if ctx.workdir is None else ctx.workdir / "checkpoints" / ctx.key / "labels"
    return phase_dataset(encoded, features, clustering, spec=spec, pca=ctx.input("pca"),
                         exclude=ctx.input("anomaly")["anomaly"], keep=keep)


def _phase_outputs(p: str, about: str, sweep: str = "n_clusters: auto") -> dict:
    return {
        f"{p}phase": Output(NAV_DIMS, f"phase id per pixel from {about} (-1: invalid pixel)"),
        f"{p}phase_fraction": Output(("cluster",), "share of the labelled pixels in each phase"),
        f"{p}phase_mean_signal": Output(("cluster", SIGNAL), "exact mean preprocessed signal of "
                                        "each phase over all its pixels"),
        f"{p}phase_centroid": Output(("cluster", f"{p and 'component' or 'latent_dim'}"),
                                     "the cluster centres in code space"),
        f"{p}phase_probability": Output((*NAV_DIMS, "cluster"), "GMM responsibilities",
                                        when="method: gmm"),
        f"{p}k_inertia": Output((f"{p}k_candidate",), "k-means inertia per K of the sweep",
                                when=sweep),
        f"{p}k_silhouette": Output((f"{p}k_candidate",), "silhouette per K (sampled)",
                                   when=sweep),
        f"{p}k_bic": Output((f"{p}k_candidate",), "GMM BIC per K", when=sweep),
    }


STAGE = Stage(
    name="cluster", config=ClusterConfig, reads=("preprocess", "train", "pca", "encode", "anomaly"),
    build=_build, library=PhaseClustering,
    about="phases: k-means or GMM on the latent codes (and on the PCA scores at the same k), "
          "anomalous pixels left out of the fit",
    outputs={
        **_phase_outputs("", "the latent codes"),
        "phase_centroid_signal": Output(("cluster", SIGNAL), "the decoder's signal at each "
                                        "centre"),
        "anomaly_mean_signal": Output((SIGNAL,), "exact mean preprocessed signal of the pixels "
                                      "flagged anomalous (attrs: pixels)",
                                      when="the anomaly stage is read (always in a run)"),
        **_phase_outputs("pca_", "the PCA scores at the latent size",
                         sweep="never in a run: the PCA scores are clustered at the codes' K"),
    },
    attrs={"phase": "method, n_clusters, chosen_by (elbow, bic, silhouette or fixed), n_iter, "
                    "sample_size, counts (labelled pixels per phase), inertia or bic, "
                    "structure (n_clusters auto: phase_structure, reasons, best_silhouette, "
                    "bic_k1, the same for pca_scores), modes "
                    "(of the sweep's BIC-best mixture) and islands (phases split out of "
                    "bigger ones), minor_phases (under min_phase_fraction), warnings",
           "pca_phase": "the same for the PCA scores"},
)
