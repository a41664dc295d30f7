"""The ``preprocess`` stage: a chain of steps run blockwise over navigation chunks.

A chain is configured as a list of steps (``[{"step": "crop", "start": 500, "stop": 800}, ...]``)
and turns a scan's ``signal`` into float32 ``features`` with the navigation kept. Steps run on
numpy blocks of ``(pixels, *signal)`` inside one dask task per navigation block, so the whole chain
is one pass over the data. A few steps need a statistic of the whole scan (the mean spectrum for
Poisson weighting, automatic dead/hot channel detection, the fitted origin of 4D-STEM patterns):
``Preprocessor.fit`` computes each by a tree reduction over the output of the steps before it, in
chain order, before the transform pass.

The steps and their parameters: ``emscale.steps``.

Value policy (applied to the raw counts before any step, and counted in the stage's provenance):

- ``nonfinite="mask"`` (default): a pixel holding any NaN/inf is zeroed and marked invalid in the
  ``valid`` map (downstream fits skip it); ``"zero"``: only those values become 0; ``"error"``:
  refuse, naming the chunk's pixel ranges.
- ``negative="clip"`` (default): negative counts become 0; ``"keep"``; ``"error"``.
- Values that become non-finite inside the chain (none should) are zeroed, their pixels marked
  invalid and counted as ``nonfinite_after_steps``, never propagated.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import dask
import dask.array as da
import numpy as np
import xarray as xr
from pydantic import Field
from sklearn.base import BaseEstimator

from emscale.blockwise import map_nav_blocks
from emscale.config import Section, defaults_of, json_safe
from emscale.errors import ConfigError, InputError, StoreError
from emscale.reduction import reduce_blocks
from emscale.stages.base import SIGNAL, Context, Output, Stage
from emscale.steps import STEPS, Coords, Step, make_step
from emscale.store import (
    COMPUTE_DTYPE,
    NAV_DIMS,
    SCAN_STORE,
    SIGNAL_DIMS,
    open_scan,
    validate_scan,
)

log = logging.getLogger(__name__)



class PreprocessConfig(Section):
    """The ``preprocess`` section: the chain and the value policy."""

    name: ClassVar[str] = "preprocess"

    steps: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"step": "normalize", "method": "sum"}],
        description="the chain, in order: {step: NAME, parameters}; NAME one of "
        + ", ".join(STEPS) + " (emscale/steps.py)")
    nonfinite: Literal["mask", "zero", "error"] = Field("mask", description=
        'NaN/inf pixels: leave them out (mask), set them to 0, or stop')
    negative: Literal["clip", "keep", "error"] = Field("clip", description=
        'negative counts: clip to 0, keep, or stop')
    store_features: Union[bool, Literal["auto"]] = Field("auto", description=
        'keep a float32 copy of the features on disk; false: each stage that reads them reruns '
        'the chain on the scan inside its own pass; auto: keep them when a pixel\'s features '
        'take at most a quarter of its stored signal (4D-STEM polar features: about 7 %), '
        'rerun the chain otherwise (EELS crops: a copy larger than the compressed scan)')


_DEFAULTS = defaults_of(PreprocessConfig)

# ---------------------------------------------------------------------------------------------
# the chain


def _clean_values(raw: np.ndarray, pos: np.ndarray, nonfinite: str, negative: str,
                  kind: str | None = None):
    """Apply the value policy to a raw (pixels, *signal) block; return float32 x, valid, counts.

    Integer counts cannot be non-finite and unsigned ones cannot be negative: those checks are
    skipped by dtype (``kind``: the dtype kind of the scan, when ``raw`` is already its counts
    binned into float32), and the others only look closer when a one-pass test finds something.
    """
    x = np.asarray(raw, dtype=COMPUTE_DTYPE)
    axes = tuple(range(1, x.ndim))
    n = x.shape[0]
    valid = np.ones(n, bool)
    n_bad = np.zeros(n, np.int64)
    n_neg = np.zeros(n, np.int64)
    kind = kind or np.dtype(raw.dtype).kind
    if kind == "f" and not np.isfinite(x.sum(dtype=np.float64)):
        bad = ~np.isfinite(x)
        n_bad = bad.sum(axis=axes, dtype=np.int64)
        if nonfinite == "error":
            raise InputError(f"chunk {_where(pos)}: {int(n_bad.sum())} NaN/inf value(s) "
                             "(preprocess.nonfinite is 'error'; 'mask' skips such pixels)")
        x = np.where(bad, np.float32(0), x)
        if nonfinite == "mask":
            valid = n_bad == 0
            x[~valid] = 0
    if kind != "u" and x.size and x.min() < 0:
        neg = x < 0
        n_neg = neg.sum(axis=axes, dtype=np.int64)
        if negative == "error":
            raise InputError(f"chunk {_where(pos)}: {int(n_neg.sum())} negative count(s) "
                             "(preprocess.negative is 'error'; 'clip' sets them to 0)")
        if negative == "clip":
            x = np.where(neg, np.float32(0), x)
    return x, valid, n_bad, n_neg


def _where(pos: np.ndarray) -> str:
    return (f"y {pos[:, 0].min()}:{pos[:, 0].max() + 1}, "
            f"x {pos[:, 1].min()}:{pos[:, 1].max() + 1}")


def _block_positions(where, nav) -> np.ndarray:
    """(pixels, 2) scan positions (y, x) of a block from ``[y0, x0, step]`` and its shape."""
    y0, x0, step = (int(v) for v in where)
    yy, xx = np.mgrid[0:nav[0], 0:nav[1]]
    return np.column_stack([y0 + step * yy.ravel(), x0 + step * xx.ravel()])


def _run_chain(where, block, *, steps, nonfinite, negative):
    """One navigation block (first pixel and step: ``where``) through the value policy and the
    steps.

    Returns features ``(by, bx, *signal_out)``, ``valid``, per-pixel counts (int32) of
    non-finite input values, negative input values and values that became non-finite in the
    chain, and the intensity.
    """
    nav = block.shape[:2]
    pos = _block_positions(where, nav)
    raw = block.reshape(-1, *block.shape[2:])
    steps = list(steps)
    kind = np.dtype(raw.dtype).kind
    if kind == "u":
        # unsigned counts have nothing for the value policy (no NaN, no negative): leading crops
        # and bins go first, so only the kept channels are converted to float32 (a crop is a
        # view; a bin sums the counts straight into float32, exact below 2^24)
        while steps and steps[0].name in ("crop", "bin"):
            raw = steps.pop(0).apply(raw, pos)
    x, valid, n_bad, n_neg = _clean_values(raw, pos, nonfinite, negative, kind)
    intensity = np.ones(x.shape[0], COMPUTE_DTYPE)  # the divisors of per-pixel scalings
    side = []  # the steps' own maps (``Step.maps``), in chain order
    for step in steps:
        if step.maps:
            x, maps = step.apply_maps(x, pos)
            side += [np.asarray(maps[name], COMPUTE_DTYPE) for name in step.maps]
            continue
        # the chain's own array (not the decoded block, which other tasks may share) may be
        # overwritten by a step
        x, divisor = step.apply_scaled(x, pos, writable=not np.may_share_memory(x, block))
        x = np.asarray(x, dtype=COMPUTE_DTYPE)
        if divisor is not None:
            intensity *= divisor
    n_after = np.zeros(x.shape[0], np.int64)
    # (x is finite here when every step keeps finite values finite: no pass to check it)
    if not all(step.keeps_finite for step in steps) and not np.isfinite(x.sum(dtype=np.float64)):
        after = ~np.isfinite(x)
        n_after = after.sum(axis=tuple(range(1, x.ndim)), dtype=np.int64)
        x = np.where(after, np.float32(0), x)
        valid &= n_after == 0
    if not valid.all():
        x[~valid] = 0
    shape = lambda a: a.reshape(nav)  # noqa: E731
    counts = (shape(n.astype(np.int32)) for n in (n_bad, n_neg, n_after))
    side = [shape(np.where(valid, m, np.float32(np.nan))) for m in side]
    return (x.reshape(*nav, *x.shape[1:]), shape(valid), *counts, shape(intensity), *side)


def _statistics_block(features, valid, yy, xx, *, step):
    pos = np.column_stack([yy.ravel(), xx.ravel()])
    x = features.reshape(-1, *features.shape[2:])
    return step.statistics(x, valid.ravel(), pos)


class Preprocessor(BaseEstimator):
    """A chain of preprocessing steps for one scan kind, in scikit-learn estimator style.

    ``fit(scan)`` prepares every step on the scan's coordinates and computes the statistics of the
    stateful ones (tree reductions on the cluster); ``transform(scan)`` returns a lazy Dataset with
    ``features`` (float32, navigation kept), ``valid`` and the value counts; ``stage_dataset`` also
    computes the counts into provenance attrs.
    """

    def __init__(self, steps: list | tuple = tuple(_DEFAULTS["steps"]),
                 nonfinite: str = _DEFAULTS["nonfinite"], negative: str = _DEFAULTS["negative"]):
        self.steps = steps
        self.nonfinite = nonfinite
        self.negative = negative

    def check(self, kind: str | None = None) -> None:
        """Check the chain's settings without data (``kind`` None: either scan kind), so that a
        workflow is refused before anything runs; coordinate ranges are checked by ``fit``."""
        self._check(kind)

    def _check(self, kind: str | None) -> list[Step]:
        chain = self.steps
        if not isinstance(chain, (list, tuple)):
            raise ConfigError(f"preprocess.steps: must be a list of steps, got {chain!r}")
        # the policies by the section; the steps one by one (errors name the step's parameter)
        PreprocessConfig.of("preprocess", nonfinite=self.nonfinite, negative=self.negative)
        steps, errors = [], []
        for i, spec in enumerate(chain):  # every step's errors at once
            try:
                steps.append(make_step(spec, i, kind))
            except ConfigError as exc:
                errors.append(str(exc))
        if errors:
            raise ConfigError("; ".join(errors))
        names = [s.name for s in steps]
        if "anscombe" in names and "poisson_weight" in names:
            raise ConfigError("preprocess.steps: 'anscombe' and 'poisson_weight' both correct for "
                              "Poisson noise; choose one")
        return steps

    def output_coords(self, kind: str, coords: dict) -> dict:
        """The signal coordinates the chain makes of a scan with these ``coords`` (no data
        read): what a workflow's later sections are checked against before anything runs."""
        for step in self._check(kind):
            step.prepare(coords)
            coords = step.output_coords()
        return coords

    def fit(self, scan: xr.Dataset, statistics: dict | None = None) -> "Preprocessor":
        """Prepare the steps and fit the stateful ones; ``statistics`` (a fitted chain's
        ``statistics_``, e.g. from a stage's provenance) restores those fits without a pass."""
        kind = validate_scan(scan)
        steps = self._check(kind)
        sig = scan["signal"]
        coords = {d: np.asarray(sig[d].values) if d in sig.coords else np.arange(sig.sizes[d],
                  dtype=np.float64) for d in SIGNAL_DIMS[kind]}
        fitted: list[Step] = []
        self.statistics_ = {}
        for i, step in enumerate(steps):
            step.prepare(coords)
            if step.stateful:
                if statistics is not None and str(i) in statistics:
                    stats = {k: np.asarray(v) if isinstance(v, list) else v
                             for k, v in statistics[str(i)].items()}
                else:
                    features, valid, *_ = self._lazy(scan, fitted, coords)
                    stats = reduce_blocks(functools.partial(_statistics_block, step=step),
                                          step.merge, features, valid, *_positions(scan),
                                          name=f"preprocess-fit-{step.name}")
                step.fit(stats)
                self.statistics_[str(i)] = stats
                log.info("fitted %s: %s", step.where, step.state())
            coords = step.output_coords()
            fitted.append(step)
        self.kind_ = kind
        self.steps_ = fitted
        self.signal_coords_ = coords
        self.signal_coords_in_ = {d: np.asarray(sig[d].values) if d in sig.coords else None
                                  for d in SIGNAL_DIMS[kind]}
        return self

    @classmethod
    def restore(cls, provenance: dict, scan: xr.Dataset) -> "Preprocessor":
        """The fitted chain of a stage's ``preprocess`` provenance, for ``scan``, without a pass."""
        chain = cls([dict(s) for s in provenance["steps"]], provenance["nonfinite"],
                    provenance["negative"])
        return chain.fit(scan, statistics=provenance.get("statistics", {}))

    def _lazy(self, scan: xr.Dataset, steps: list[Step], out_coords: Coords, stride: int = 1):
        """The chain as dask arrays: features, valid, the three count maps and the intensity.

        One task per navigation block runs the chain and returns a tuple; each output's block is
        a ``getitem`` of it (``blockwise.map_nav_blocks``). (``apply_gufunc`` does the same but
        adds a transpose layer per output that dask cannot fuse once an output has two
        consumers: 17 ms per block.)
        """
        sig = scan["signal"]
        data = sig.data if isinstance(sig.data, da.Array) else da.from_array(sig.data, chunks=-1)
        if stride > 1:  # every stride-th pixel each way: the chain runs on those alone, in
            # blocks merged back to about the stored chunks' size (not one tiny task per chunk)
            limit = max(data.dtype.itemsize * int(np.prod([c[0] for c in data.chunks])), 1 << 20)
            # the slice fused into the reads now (dask's array optimisation): a lazily generated
            # source (a synthetic scan's clean signal) then makes only the sampled pixels, however
            # the graph is computed later (a rechunk after it kept that from happening)
            (data,) = dask.optimize(data[::stride, ::stride])
            data = data.rechunk(("auto", "auto", *(-1,) * (data.ndim - 2)),
                                block_size_limit=limit)
        fn = functools.partial(_run_chain, steps=tuple(steps), nonfinite=self.nonfinite,
                               negative=self.negative)
        tail = tuple(v.size for v in out_coords.values())
        outputs = [(tail, COMPUTE_DTYPE), ((), bool), ((), np.int32), ((), np.int32),
                   ((), np.int32), ((), COMPUTE_DTYPE)]
        outputs += [((), COMPUTE_DTYPE) for step in steps for _ in step.maps]
        return tuple(map_nav_blocks(fn, [data], outputs, name="preprocess", origin_step=stride))

    def transform(self, scan: xr.Dataset, stride: int = 1) -> xr.Dataset:
        """The lazy stage output: ``features``, ``valid`` and per-pixel value counts; of every
        ``stride``-th pixel along y and x only, when given (a sample grid)."""
        if not hasattr(self, "steps_"):
            raise ConfigError("preprocess: call fit before transform")
        if validate_scan(scan) != self.kind_:
            raise ConfigError(f"preprocess: fitted on a {self.kind_} scan, got a {scan.attrs['kind']}")
        features, valid, n_bad, n_neg, n_after, intensity, *side = self._lazy(
            scan, self.steps_, self.signal_coords_, stride)
        nav = {d: scan[d][::stride] for d in NAV_DIMS if d in scan.coords}
        sig_dims = tuple(self.signal_coords_)
        coords = {**nav, **{d: (d, v, _coord_attrs(scan, d))
                            for d, v in self.signal_coords_.items()}}
        ds = xr.Dataset(
            {
                "features": (NAV_DIMS + sig_dims, features),
                "valid": (NAV_DIMS, valid),
                "nonfinite_count": (NAV_DIMS, n_bad),
                "negative_count": (NAV_DIMS, n_neg),
                "nonfinite_after_steps": (NAV_DIMS, n_after),
                "intensity": (NAV_DIMS, intensity, {
                    "long_name": "divisor of the normalize step per pixel (1 without one): "
                                 "the features times it are back on the scale before it"}),
            },
            coords=coords,
            attrs={"kind": self.kind_, "preprocess": self.provenance()},
        )
        names = [(step.name, name, about) for step in self.steps_
                 for name, about in step.maps.items()]
        for (step, name, (long_name, units)), values in zip(names, side):
            ds[f"{step}_{name}"] = (NAV_DIMS, values, {"long_name": long_name, "units": units})
        return ds

    def fit_transform(self, scan: xr.Dataset) -> xr.Dataset:
        return self.fit(scan).transform(scan)

    def provenance(self) -> dict[str, Any]:
        return {
            "steps": [_step_config(s) for s in self.steps_],
            "fitted": [{"step": s.name, **s.state()} for s in self.steps_ if s.state()],
            "statistics": json_safe(self.statistics_),  # what restore() fits from
            "nonfinite": self.nonfinite,
            "negative": self.negative,
        }


def _coord_attrs(scan: xr.Dataset, dim: str) -> dict:
    """A feature coordinate's attrs: the scan's, or for the polar step's radius those of ky (its
    unit: the detector's calibration)."""
    if dim in scan.coords:
        return dict(scan[dim].attrs)
    if dim == "radius" and "ky" in scan.coords and "units" in scan["ky"].attrs:
        return {"units": scan["ky"].attrs["units"], "long_name": "distance from the pattern centre"}
    return {}


def _positions(scan: xr.Dataset) -> tuple[da.Array, da.Array]:
    """Integer (y, x) index grids chunked like the signal's navigation."""
    sig = scan["signal"]
    chunks = sig.chunks[:2] if sig.chunks else tuple((n,) for n in sig.shape[:2])
    ny, nx = sig.shape[:2]
    yy = da.broadcast_to(da.arange(ny, chunks=chunks[0])[:, None], (ny, nx), chunks=chunks)
    xx = da.broadcast_to(da.arange(nx, chunks=chunks[1])[None, :], (ny, nx), chunks=chunks)
    return yy, xx


def _step_config(step: Step) -> dict[str, Any]:
    out = {"step": step.name}
    for f in dataclasses.fields(step):
        if f.name != "where":
            v = getattr(step, f.name)
            out[f.name] = v.tolist() if isinstance(v, np.ndarray) else v
    return out


def summarize_counts(ds: xr.Dataset) -> dict[str, int]:
    """The value-policy counts of a transformed Dataset (computed: one small reduction each)."""
    import dask

    totals = dask.compute(ds["nonfinite_count"].sum().data, ds["negative_count"].sum().data,
                          ds["nonfinite_after_steps"].sum().data, (~ds["valid"]).sum().data)
    return dict(zip(("nonfinite_values", "negative_values", "nonfinite_after_steps",
                     "invalid_pixels"), (int(t) for t in totals)))


STORE_SHARE = 0.25  # store_features "auto": a copy at most this share of the stored signal


def stores_features(setting: bool | str, scan: xr.Dataset, preprocessor: Preprocessor) -> bool:
    """Whether a ``preprocess`` stage of ``scan`` keeps its features (``store_features``): with
    ``"auto"``, when a pixel's float32 features take at most ``STORE_SHARE`` of its signal in
    the stored dtype. Then the copy costs a small part of the scan's disk, and the stages that
    read it skip the chain and most of the bytes (4D-STEM polar features: 544 floats against
    16 384 counts); a crop of spectra would be a copy larger than the compressed scan."""
    if setting != "auto":
        return bool(setting)
    sig = scan["signal"]
    stored = sig.dtype.itemsize * int(np.prod(sig.shape[2:]))
    out = np.dtype(COMPUTE_DTYPE).itemsize * int(np.prod(
        [v.size for v in preprocessor.signal_coords_.values()]))
    return out <= STORE_SHARE * stored


def preprocess_stage(scan: xr.Dataset, preprocessor: Preprocessor,
                     store_features: bool | str = True) -> xr.Dataset:
    """Fit (if needed) the chain on ``scan`` and return the lazy ``preprocess`` stage: features,
    valid map, value counts and per-pixel ``intensity``. A synthetic scan's ``label`` map is
    copied, and its ``clean`` signal goes through the same fitted chain into ``clean_features``
    (the denoising target): stored for a scan in memory, else recomputed where read
    (``features_of``), since generating a big scan's clean signal is its slowest part.

    Without ``store_features`` (see ``stores_features`` for ``"auto"``; and for a scan read from
    a store, ``open_scan``) the features are left out: the stage keeps the per-pixel maps, the
    fitted chain and the scan store's path, and ``features_of`` reruns the chain on the scan
    wherever they are read, inside that pass."""
    if not hasattr(preprocessor, "steps_"):
        preprocessor.fit(scan)
    ds = preprocessor.transform(scan)
    store = scan.encoding.get(SCAN_STORE)
    if store is None:
        if "clean" in scan:
            ds["clean_features"] = preprocessor.transform(scan.assign(signal=scan["clean"]))["features"]
    else:
        stored = stores_features(store_features, scan, preprocessor)
        if not stored:
            ds = ds.drop_vars("features")
        ds.attrs["scan_store"] = store
        ds.attrs["features_stored"] = stored
    if "label" in scan:
        ds["label"] = scan["label"]
        ds["label"].attrs = dict(scan["label"].attrs)
    ds.attrs["source"] = scan.attrs.get("source", {})
    ds.attrs = json_safe(ds.attrs)
    return ds


def features_of(stage: xr.Dataset, stride: int = 1) -> xr.Dataset:
    """A ``preprocess`` stage as its readers see it: with ``features`` (and ``clean_features``
    for a synthetic scan), read from the group if it stores them, else recomputed lazily from the
    scan store by the fitted chain (no pass until computed). With ``stride``: every
    ``stride``-th pixel along y and x, the chain run on those alone (training's sample grid)."""
    path = stage.attrs.get("scan_store")
    strided = (lambda ds: ds if stride == 1 else ds.isel(y=slice(None, None, stride),
                                                         x=slice(None, None, stride)))
    if path is None or stage.attrs.get("features_stored"):
        if "features" not in stage:
            raise StoreError("preprocess: the stage has neither features nor the scan store they "
                             "are computed from")
        if path is None or not Path(path).exists():
            return strided(stage)  # in memory, or a stored copy whose scan is gone
        scan = open_scan(path)
        if "clean" not in scan:
            return strided(stage)
        # stored features; a synthetic scan's clean ones from the scan, on the sampled pixels
        out = strided(stage.drop_vars("clean_features", errors="ignore"))
        chain = Preprocessor.restore(stage.attrs["preprocess"], scan)
    else:
        # recomputed: from the scan, even when given a stage with them already attached at full
        # resolution (slicing those would run the chain on every pixel, then keep a few)
        stage = stage.drop_vars(["features", "clean_features"], errors="ignore")
        if not Path(path).exists():
            raise StoreError(f"preprocess: the features are computed from the scan store {path}, "
                             "which is gone: restore it, or rerun with --force preprocess")
        scan = open_scan(path)
        chain = Preprocessor.restore(stage.attrs["preprocess"], scan)
        out = strided(stage)
        features = chain.transform(scan, stride)["features"]
        # the maps (read in large blocks) split to the features' blocks, one task per block
        out = out.chunk(dict(zip(NAV_DIMS, features.chunks[:2]))).assign(features=features)
    if "clean" in scan:
        out["clean_features"] = chain.transform(scan.assign(signal=scan["clean"]),
                                                stride)["features"]
    return out


def write_preprocess_stage(results, scan: xr.Dataset, preprocessor: Preprocessor, *,
                           overwrite: bool = False, progress: bool = False) -> xr.Dataset:
    """``preprocess_stage`` written as the ``preprocess`` group of ``results`` (a
    ``ResultsStore``) in one pass; the value-policy totals go into its attrs."""
    return results.write_stage("preprocess", preprocess_stage(scan, preprocessor),
                               overwrite=overwrite, finalize=_value_counts, progress=progress)


def _value_counts(written: xr.Dataset) -> dict:
    return {"value_counts": summarize_counts(written)}


def _build(ctx: Context) -> xr.Dataset:
    cfg = ctx.config
    return preprocess_stage(ctx.input("scan"), Preprocessor(list(cfg.steps), cfg.nonfinite,
                                                            cfg.negative), cfg.store_features)


STAGE = Stage(
    name="preprocess", config=PreprocessConfig, reads=("scan",), build=_build,
    library=Preprocessor,
    finalize=_value_counts, reopen=features_of,
    not_in_library={"store_features": "preprocess_stage(scan, chain, store_features)"},
    about="the scan's signal through the chain of steps: float32 features, navigation kept "
          "(stored, or recomputed from the scan store by each stage that reads them)",
    outputs={
        "features": Output((*NAV_DIMS, SIGNAL), "the preprocessed signal (float32); the signal "
                           "dims are the scan's (energy, or ky kx) after crop/bin; without it "
                           "the stage's readers rerun the chain on the scan (features_of)",
                           when="preprocess.store_features (auto: features of at most a "
                           "quarter of the stored signal), or a scan not read from a store"),
        "valid": Output(NAV_DIMS, "false for pixels left out (non-finite input under nonfinite: mask)"),
        "nonfinite_count": Output(NAV_DIMS, "NaN/inf values of the pixel's raw signal", "values"),
        "negative_count": Output(NAV_DIMS, "negative values of the pixel's raw signal", "values"),
        "nonfinite_after_steps": Output(NAV_DIMS, "values that became non-finite in the chain",
                                        "values"),
        "intensity": Output(NAV_DIMS, "divisor of the normalize step per pixel (1 without one): the "
                            "features times it are back on the scale before it", "counts"),
        "clean_features": Output((*NAV_DIMS, SIGNAL), "the clean (noise-free) signal through the "
                                 "same fitted chain", when="a synthetic scan in memory (from a "
                                 "store: recomputed from its clean signal where read)"),
        "label": Output(NAV_DIMS, "ground-truth phase id, -1 anomalous", when="a synthetic scan"),
        "polar_orientation": Output(NAV_DIMS, "in-plane orientation of the pattern (the phase "
                                    "of its strongest angular harmonic m, modulo 360/m); "
                                    "relative within a phase", "degree",
                                    when="a polar step in the chain"),
        "polar_symmetry": Output(NAV_DIMS, "the angular harmonic m of polar_orientation",
                                 when="a polar step in the chain"),
    },
    attrs={"preprocess": "the fitted chain (steps with parameters, fitted statistics) and the "
                         "value policy", "source": "the raw file's path, size and sha256",
           "value_counts": "totals: nonfinite_values, negative_values, nonfinite_after_steps, "
                           "invalid_pixels", "kind": "spectrum or diffraction",
           "scan_store": "the scan store the stage was made from (the features are recomputed "
                         "from it when not stored)",
           "features_stored": "whether the group holds the features (store_features)"},
)
