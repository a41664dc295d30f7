"""The ``anomaly`` stage: reconstruction error, latent Mahalanobis distance, a combined score and a
calibrated threshold, in two passes over an ``encode`` stage: the fit (one tree reduction), then
the scores written.

``AnomalyScorer`` is an estimator. ``fit(encoded, normal=...)`` learns from the pixels declared
normal (a boolean (y, x) map, a region of the scan, or the whole scan: ``normal=None``):
- the latent codes' mean and covariance (Chan's tree-merged scatter), for the Mahalanobis distance;
- the mean and standard deviation of the log of each score, to put both on one scale;
- the threshold on the chosen score.
The codes' mean and covariance and the log errors' moments are exact; the scores' centres,
spreads and threshold (statistics of the distance, which needs the fitted covariance) are taken
on a spatially even sample of at most ``SCORE_SAMPLE`` normal pixels gathered in the same pass
(all of them on a scan or region up to that size): their standard errors at the full sample,
0.3 % of the spread for the median and 0.7 % for a 99th percentile, are far below the scores' own
scatter, and the fit stays one pass whatever the scan's size (it was seven: the distance
recomputed in each).

The combined score is ``max(z_error, z_mahalanobis)``: each score's log, standardised on the normal
pixels, so a pixel is anomalous when either its spectrum is badly reconstructed (new features the
decoder cannot make) or its code lies far from the normal codes (known features in a new mix).

Calibration:
- ``"reference"``: the threshold is the ``1 - false_alarm_rate`` quantile (or ``quantile``) of
  the score over the normal pixels. The normal pixels must be normal: declare a clean region, or
  fit on a reference scan and ``score`` another one.
- ``"robust"`` (default): for a scan with no declared reference, where anomalies are a minority: the
  standardisation uses the median and the MAD (quantile sketches) instead of mean and standard
  deviation, and the threshold is the Gaussian tail of the false-alarm rate (default 1 %) on the
  standardised log scores.

``score(encoded)`` gives ``mahalanobis``, ``anomaly_score`` and ``anomaly`` (threshold, method and
calibration in its attrs) for that scan or any other encoded with the same model.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal, Optional

import dask
import dask.array as da
import numpy as np
import xarray as xr
from pydantic import Field, model_validator
from scipy.stats import norm
from sklearn.base import BaseEstimator

from emscale.config import Section, defaults_of
from emscale.errors import ConfigError
from emscale.reduction import reduce_blocks
from emscale.stages.base import Context, Output, Stage
from emscale.stages.encode import latent_dim
from emscale.stages.pca import merge_scatter
from emscale.store import NAV_DIMS, finite_rows

DEFAULT_FALSE_ALARM_RATE = 0.01


class AnomalyConfig(Section):
    """The ``anomaly`` section: the score, its threshold, and where normal data come from (which
    the ``train`` stage uses too)."""

    name: ClassVar[str] = "anomaly"

    method: Literal["combined", "recon_error", "mahalanobis"] = Field("combined", description=
        'anomaly score: reconstruction error, latent Mahalanobis distance, or the larger of both')
    density: Literal["gaussian", "mixture"] = Field("gaussian", description=
        'the normal codes as one Gaussian, or as a Gaussian mixture (K by BIC, up to 8; the '
        'distance is to the component the code most likely belongs to: phases are several '
        'clouds; modes of the mixture holding at most 5 % of the codes are not normal)')
    calibration: Literal["reference", "robust"] = Field("robust", description=
        'threshold: quantile of normal data (reference/region), or median/MAD of the scan itself')
    false_alarm_rate: Optional[float] = Field(None, gt=0, le=0.5, description=(
        "share of normal pixels flagged; null: 0.01 (or 1 - quantile)"))
    quantile: Optional[float] = Field(None, ge=0.5, lt=1, description=
        'the same as a quantile of normal scores (1 - false_alarm_rate); give one of the two')
    normal_region: Optional[tuple[int, int, int, int]] = Field(
        None, description="(y0, y1, x0, x1) declared normal: training and calibration use it")
    reference: Optional[Path] = Field(
        None, description="a scan store of normal data: the model is trained and calibrated on it")

    @model_validator(mode="after")
    def _consistent(self):
        if self.normal_region is not None and self.reference is not None:
            raise ValueError("give normal_region or reference, not both")
        if self.quantile is not None and self.false_alarm_rate is not None:
            raise ValueError("give false_alarm_rate or quantile (= 1 - false_alarm_rate), not both")
        r = self.normal_region
        if r is not None and not (min(r) >= 0 and r[0] < r[1] and r[2] < r[3]):
            raise ValueError(f"normal_region: must be (y0, y1, x0, x1) with 0 <= y0 < y1 and "
                             f"0 <= x0 < x1, got {list(r)}")
        return self


_DEFAULTS = defaults_of(AnomalyConfig)


def _fit_block(latent, err, mask, *, stride):
    """Scatter of the codes and moments of log(error) over the masked, finite pixels (error > 0),
    and the sample: every ``stride``-th masked pixel with a finite code and error, as float32
    rows ``[code..., error]``. A million pixels of 4-d codes: 92 -> 36 ms (no copy of all
    finite codes before the stride, no float32 copy before the float64 one, centred in place)."""
    z32 = np.asarray(latent).reshape(-1, latent.shape[-1])
    e32 = np.asarray(err).ravel()
    finite = np.asarray(mask, bool).ravel() & np.isfinite(e32) & finite_rows(z32)
    rows = np.flatnonzero(finite)[::stride]
    sample = np.column_stack([z32[rows], e32[rows]]).astype(np.float32)
    keep = finite & (e32 > 0)
    if not keep.all():
        z32, e32 = z32[keep], e32[keep]
    n = len(z32)
    if n == 0:
        return {"codes": {"n": 0, "mean": np.zeros(z32.shape[1]),
                          "m2": np.zeros((z32.shape[1],) * 2)},
                "log_error": {"n": 0, "mean": np.zeros(1), "m2": np.zeros(1)}, "sample": sample}
    z, le = z32.astype(np.float64), np.log(e32, dtype=np.float64)
    mz, me = z.mean(axis=0), le.mean(keepdims=True)
    z -= mz
    le -= me
    return {"codes": {"n": n, "mean": mz, "m2": z.T @ z},
            "log_error": {"n": n, "mean": me, "m2": np.array([le @ le])},
            "sample": sample}


def _merge_fit(parts):
    return {**{k: merge_scatter([p[k] for p in parts]) for k in ("codes", "log_error")},
            "sample": np.concatenate([p["sample"] for p in parts])}


def _mixture_one(sample: np.ndarray, k: int, ridge: float):
    """A ``k``-component Gaussian mixture of the sample codes and its BIC."""
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(k, covariance_type="full", reg_covar=ridge, random_state=0,
                         n_init=1).fit(sample)
    return gm, float(gm.bic(sample))


def _mahalanobis_block(latent, means, precisions, log_prior):
    """Distance of each code to the normal codes: its Mahalanobis distance to the component (of
    ``means`` (K, d), ``precisions`` (K, d, d); one for a single Gaussian) it most likely belongs
    to, by ``log_prior`` (K,: log weight + log det(precision) / 2) - d^2 / 2."""
    z = np.asarray(latent, np.float64)
    flat = z.reshape(-1, z.shape[-1])
    d2 = np.empty((len(flat), len(means)))
    for c, (m, p) in enumerate(zip(means, precisions)):
        # (x - m) P (x - m)^T row by row: a GEMM then a row-wise dot (a three-operand einsum
        # loops in C without BLAS: 4x slower; the stage recomputes this in each of its passes)
        d = flat - m
        d2[:, c] = np.einsum("ij,ij->i", d @ p, d)
    best = np.argmax(log_prior - 0.5 * d2, axis=1) if len(means) > 1 else 0
    out = np.sqrt(np.maximum(d2[np.arange(len(flat)), best], 0)).astype(np.float32)
    return out.reshape(z.shape[:-1])


SCORE_SAMPLE = 1 << 18  # normal pixels the scores' centres, spreads and threshold are taken on
MIXTURE_SAMPLE = 20000  # codes the mixture is fitted on (a spatially even sample)
MIXTURE_COMPONENTS = 8  # the most components tried (BIC chooses)
MINOR_SHARE = 0.05  # a mode of at most this weight is not normal (cluster.island_share's)


class AnomalyScorer(BaseEstimator):
    def __init__(self, method: str = _DEFAULTS["method"],
                 calibration: str = _DEFAULTS["calibration"],
                 density: str = _DEFAULTS["density"],
                 quantile: float | None = _DEFAULTS["quantile"],
                 false_alarm_rate: float | None = _DEFAULTS["false_alarm_rate"]):
        self.method = method
        self.calibration = calibration
        self.density = density
        self.quantile = quantile
        self.false_alarm_rate = false_alarm_rate

    def _check(self) -> None:
        AnomalyConfig.of("anomaly", method=self.method, calibration=self.calibration,
                         density=self.density, quantile=self.quantile,
                         false_alarm_rate=self.false_alarm_rate)

    @property
    def target_rate(self) -> float:
        """The intended false-alarm rate on normal pixels."""
        if self.false_alarm_rate is not None:
            return self.false_alarm_rate
        return 1 - self.quantile if self.quantile is not None else DEFAULT_FALSE_ALARM_RATE

    def fit(self, encoded: xr.Dataset, normal: xr.DataArray | np.ndarray | None = None) -> "AnomalyScorer":
        """Learn the normal codes and the threshold from ``encoded``'s pixels where ``normal``
        (a (y, x) boolean map; ``None``: the whole scan)."""
        self._check()
        latent, err = encoded["latent"].data, encoded["recon_error"].data
        mask = self._mask(encoded, normal)
        n_mask = int(mask.sum().compute()) if normal is not None else math.prod(mask.shape)
        stats = reduce_blocks(partial(_fit_block, stride=max(1, n_mask // SCORE_SAMPLE)),
                              _merge_fit, latent, err, mask, name="anomaly-fit")
        codes = stats["codes"]
        if codes["n"] < latent_dim(encoded) + 2:
            raise ConfigError(f"anomaly: only {codes['n']} normal pixel(s) with finite codes; "
                              "declare a larger normal region")
        cov = codes["m2"] / (codes["n"] - 1)
        # a small ridge keeps the inverse finite when a latent dimension is (nearly) unused
        ridge = 1e-6 * max(np.trace(cov) / len(cov), 1e-30)
        self.latent_mean_ = codes["mean"]
        self.latent_covariance_ = cov
        self.latent_precision_ = np.linalg.inv(cov + ridge * np.eye(len(cov)))
        self.n_normal_ = int(codes["n"])
        sample_codes, sample_err = stats["sample"][:, :-1], stats["sample"][:, -1]
        self.mixture_ = self._mixture(sample_codes) if self.density == "mixture" else None
        log_err = _log_np(sample_err)
        log_dist = _log_np(_mahalanobis_block(sample_codes, *self._density()))
        if self.calibration == "reference":
            self.log_error_centre_, self.log_error_spread_ = _centre_spread(stats["log_error"])
            self.log_distance_centre_, self.log_distance_spread_ = _mean_sd(log_dist)
            score = self._score_np(log_err, log_dist)
            self.threshold_ = float(np.quantile(score[np.isfinite(score)], 1 - self.target_rate,
                                                method="inverted_cdf"))
        else:
            (self.log_error_centre_, self.log_error_spread_), \
                (self.log_distance_centre_, self.log_distance_spread_) = \
                _median_mad(log_err), _median_mad(log_dist)
            p = self.target_rate
            # max of two (nearly independent) standard normals exceeds t with probability
            # 1 - Phi(t)^2
            self.threshold_ = float(norm.ppf(math.sqrt(1 - p)) if self.method == "combined"
                                    else norm.ppf(1 - p))
        return self

    @staticmethod
    def _mask(encoded: xr.Dataset, normal) -> da.Array:
        latent = encoded["latent"].data
        shape, chunks = latent.shape[:2], latent.chunks[:2]
        if normal is None:
            return da.ones(shape, bool, chunks=chunks)
        m = normal.data if isinstance(normal, xr.DataArray) else normal
        if tuple(m.shape) != tuple(shape):
            raise ConfigError(f"anomaly.normal: the normal map is {tuple(m.shape)}, the scan {shape}")
        m = m if isinstance(m, da.Array) else da.from_array(np.asarray(m, bool), chunks=chunks)
        return m.astype(bool).rechunk(chunks)

    def _mixture(self, codes: np.ndarray) -> dict:
        """A Gaussian mixture of the normal codes (``codes``: the fit's sample of them), K by
        BIC: the codes of a scan with several phases are several clouds, around which one
        Gaussian's distance is not Gaussian (a smaller phase far from the mean is 'far' as a
        whole: 16 % of a 4D-STEM scan's cubic pixels flagged here)."""

        from emscale.mixture_modes import mode_groups

        sample = codes[::max(1, len(codes) // MIXTURE_SAMPLE)].astype(np.float64)
        ridge = 1e-6 * max(float(np.trace(self.latent_covariance_)) / len(sample.T), 1e-30)
        # one task per number of components on the cluster (the sample sent once), BIC chooses;
        # at least 4 codes per dimension and component (one Gaussian on a very small scan)
        top = max(1, min(MIXTURE_COMPONENTS, len(sample) // (4 * sample.shape[1])))
        shared = dask.delayed(sample, pure=True)
        fits = dask.compute(*[dask.delayed(_mixture_one, pure=True)(shared, k, ridge)
                              for k in range(1, top + 1)])
        best = min(fits, key=lambda fit: fit[1])[0]  # the first of equal BICs: the fewest
        # the normal codes are the modes of the density (components joined by their ridgeline,
        # as the clusters' islands) above the minor share: a small mode far from the rest is
        # rare structure, whose codes are then far from every normal one, while a phase the BIC
        # split into small components stays normal (a 4D-STEM phase of 16 % in 4 % pieces: 24 %
        # of it flagged). Also for codes declared normal: a reference scan's small, tight
        # components made its 99th percentile too tight for another scan (49 % of a 4D-STEM
        # scan flagged, against 1.4 % with them left out)
        groups = mode_groups(best.weights_, best.means_, best.covariances_)
        mode_weight = np.bincount(groups, weights=best.weights_)[groups]
        major = mode_weight > MINOR_SHARE
        if not major.any():
            major = best.weights_ == best.weights_.max()
        precisions = best.precisions_[major]
        log_det = np.array([np.linalg.slogdet(p)[1] for p in precisions])
        return {"means": best.means_[major], "precisions": precisions,
                "log_prior": np.log(best.weights_[major]) + 0.5 * log_det,
                "weights": best.weights_.tolist(), "modes": groups.tolist(),
                "major": major.tolist()}

    def _density(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The normal codes' means (K, d), precisions (K, d, d) and log priors (K,)."""
        if self.mixture_ is not None:
            m = self.mixture_
            return m["means"], m["precisions"], m["log_prior"]
        return self.latent_mean_[None], self.latent_precision_[None], np.zeros(1)

    def _mahalanobis(self, latent: da.Array) -> da.Array:
        return latent.map_blocks(_mahalanobis_block, *self._density(), drop_axis=2,
                                 dtype=np.float32, token="anomaly-mahalanobis")

    def _score_np(self, log_err, log_dist):
        """The method's score from the logs of the error and distance (numpy or dask)."""
        z_err = (log_err - self.log_error_centre_) / self.log_error_spread_
        z_dist = (log_dist - self.log_distance_centre_) / self.log_distance_spread_
        if self.method == "recon_error":
            return z_err
        if self.method == "mahalanobis":
            return z_dist
        return np.maximum(z_err, z_dist)

    def _score(self, err: da.Array, maha: da.Array) -> da.Array:
        return self._score_np(_log(err), _log(maha)).astype(np.float32)

    def score(self, encoded: xr.Dataset) -> xr.Dataset:
        """``mahalanobis``, ``anomaly_score`` and ``anomaly`` (lazy) of an encoded scan."""
        if not hasattr(self, "threshold_"):
            raise ConfigError("anomaly: call fit before score")
        latent = encoded["latent"].data
        if latent_dim(encoded) != len(self.latent_mean_):
            raise ConfigError(f"anomaly: fitted on {len(self.latent_mean_)}-D codes, "
                              f"the scan has {latent_dim(encoded)}-D codes (another model?)")
        maha = self._mahalanobis(latent)
        score = self._score(encoded["recon_error"].data, maha)
        flagged = score > self.threshold_  # NaN (invalid pixels) compares False
        attrs = {"threshold": self.threshold_, "method": self.method,
                 "calibration": self.calibration, "target_false_alarm_rate": self.target_rate,
                 "n_normal": self.n_normal_}
        coords = {d: encoded[d] for d in NAV_DIMS if d in encoded.coords}
        return xr.Dataset(
            {"mahalanobis": (NAV_DIMS, maha, {"long_name": "latent Mahalanobis distance to the "
                                                            "normal codes"}),
             "anomaly_score": (NAV_DIMS, score, {"long_name": f"{self.method} score "
                                                              "(standardised log scale)"}),
             "anomaly": (NAV_DIMS, flagged, attrs)},
            coords=coords, attrs={"anomaly": {**attrs, **self.summary()}})

    def summary(self) -> dict:
        return {"latent_mean": self.latent_mean_.tolist(),
                "density": self.density,
                "mixture_weights": None if self.mixture_ is None else self.mixture_["weights"],
                "mixture_major": None if self.mixture_ is None else self.mixture_["major"],
                "log_error_centre": self.log_error_centre_,
                "log_error_spread": self.log_error_spread_,
                "log_distance_centre": self.log_distance_centre_,
                "log_distance_spread": self.log_distance_spread_}


def _log(values: da.Array) -> da.Array:
    """The log of a score, a zero (a perfect reconstruction, a code on the mean: all of them on
    an empty pattern) taken as the smallest float32 rather than minus infinity."""
    return da.log(da.maximum(values, np.finfo(np.float32).tiny))


def _log_np(values: np.ndarray) -> np.ndarray:
    """``_log`` of a sample (float64)."""
    return np.log(np.maximum(np.asarray(values, np.float64), np.finfo(np.float32).tiny))


def _centre_spread(moments: dict) -> tuple[float, float]:
    n = moments["n"]
    sd = math.sqrt(float(moments["m2"][0]) / max(n - 1, 1))
    return float(moments["mean"][0]), max(sd, 1e-12)


def _mean_sd(log_values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of the finite log values of positive scores."""
    v = log_values[np.isfinite(log_values) & (log_values > np.log(np.finfo(np.float32).tiny))]
    if not len(v):
        raise ConfigError("anomaly: no normal pixel with a positive distance to calibrate on")
    return float(v.mean()), max(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 1e-12)


def _median_mad(log_values: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 MAD (the standard deviation of a normal) of the finite values."""
    v = log_values[np.isfinite(log_values)]
    if not len(v):
        raise ConfigError("anomaly: no normal pixel with a finite score to calibrate on")
    med = float(np.median(v))
    return med, max(1.4826 * float(np.median(np.abs(v - med))), 1e-12)


def fit_where_normal(scorer: AnomalyScorer, encoded: xr.Dataset, normal) -> AnomalyScorer:
    """Fit ``scorer`` on the normal data of ``normal`` (``NormalData``): the reference scan
    encoded with the same model, the declared region of ``encoded``, or all of ``encoded``."""
    if normal.reference is not None:
        return scorer.fit(normal.reference_encoded())
    if normal.region is not None:
        y0, y1, x0, x1 = normal.region
        mask = np.zeros(encoded["latent"].shape[:2], bool)
        mask[y0:y1, x0:x1] = True
        return scorer.fit(encoded, normal=mask)
    return scorer.fit(encoded)


def _build(ctx: Context) -> xr.Dataset:
    cfg = ctx.config
    scorer = AnomalyScorer(cfg.method, cfg.calibration, density=cfg.density, quantile=cfg.quantile,
                           false_alarm_rate=cfg.false_alarm_rate)
    encoded = ctx.input("encode")
    return fit_where_normal(scorer, encoded, ctx.normal).score(encoded)


STAGE = Stage(
    name="anomaly", config=AnomalyConfig, reads=("encode",), build=_build, uses_normal=True,
    library=AnomalyScorer,
    not_in_library={"normal_region": "NormalData.region (fit_where_normal)",
                    "reference": "NormalData.reference (fit_where_normal)"},
    about="anomaly scores per pixel and the anomaly map at a calibrated threshold",
    outputs={
        "mahalanobis": Output(NAV_DIMS, "latent Mahalanobis distance to the normal codes"),
        "anomaly_score": Output(NAV_DIMS, "the method's score, standardised log scale"),
        "anomaly": Output(NAV_DIMS, "flagged pixels (score above the threshold); attrs "
                          "threshold, method, calibration, target_false_alarm_rate, n_normal"),
    },
    attrs={"anomaly": "threshold, method, calibration, target_false_alarm_rate, n_normal, "
                      "latent_mean, density, mixture_weights/major, log_error_centre/spread, "
                      "log_distance_centre/spread"},
)


def write_anomaly_stage(results, encoded: xr.Dataset, scorer: AnomalyScorer, *,
                        overwrite: bool = False, progress: bool = False) -> xr.Dataset:
    """Score ``encoded`` with a fitted ``scorer`` and write the ``anomaly`` stage group."""
    return results.write_stage("anomaly", scorer.score(encoded), overwrite=overwrite,
                               progress=progress)
