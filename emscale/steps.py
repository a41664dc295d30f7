"""The preprocessing steps: each maps a ``(pixels, *signal)`` float32 block; the chain that runs
them over a scan is ``emscale.stages.preprocess``.

Steps (``kind`` is the scan kind they apply to):

==================  ==========  ==============================================================
step                kind        parameters
==================  ==========  ==============================================================
``crop``            spectrum    ``start``, ``stop``: energy range kept (the axis' units: eV, keV)
``crop``            diffraction ``ky``, ``kx``: ``[first, stop)`` pixel index ranges kept
``bin``             both        ``factor``: sum groups of channels (or factor x factor pixels);
                                a remainder at the end is dropped
``mask_channels``   spectrum    ``ranges``: ``[[lo, hi], ...]`` energy ranges to drop;
                                ``auto``: also drop dead channels (zero mean) and hot channels
                                (mean above both neighbours by ``hot_sigma`` robust sd of the
                                channel-to-channel steps of the mean spectrum, and by a factor
                                ``hot_ratio``, default 2)
``background``      spectrum    ``window``: ``[lo, hi]`` pre-edge window; a power law
                                ``A * E**-r`` fitted per pixel (least squares in log-log, counts
                                clipped at 1) and subtracted from every channel
``centre``          diffraction ``method``: ``"com"`` (shift each pattern's centre of mass to the
                                pattern centre) or ``"fit"`` (fit a plane to the centres of mass
                                over the scan, the descan, and shift by it); ``radius``: compute
                                the centre of mass within this radius of the pattern centre only
``circular_crop``   diffraction ``radius``: zero everything further than this from the centre
``beam_mask``       diffraction ``radius``: zero the central beam (everything within the radius)
``scale``           both        ``method``: ``"log"`` (log1p) or ``"sqrt"``; negatives become 0
``anscombe``        both        Poisson variance stabilisation ``2 * sqrt(x + 3/8)``
``poisson_weight``  both        Keenan-Kotula weighting ``x / sqrt(g_pixel * h_channel)`` with
                                ``h`` the mean signal over the scan and ``g`` each pixel's total
                                over the mean total: unit noise variance for Poisson counts
``normalize``       both        ``method``: ``"sum"`` (unit sum), ``"max"`` (unit maximum) or
                                ``"none"``; a pixel whose sum or maximum is not positive is left
==================  ==========  ==============================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from dask.base import tokenize

from emscale.config import did_you_mean
from emscale.errors import ConfigError
from emscale.store import COMPUTE_DTYPE

Coords = dict[str, np.ndarray]


@dataclass
class Step:
    """One preprocessing step. ``prepare`` sees the input coordinates once, when the chain is
    built; ``apply`` maps a ``(pixels, *signal)`` float32 block; stateful steps also define
    ``statistics`` (per block), ``merge`` (partial results) and ``fit`` (the merged result)."""

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ("spectrum", "diffraction")
    # finite input gives finite output (the chain then skips its check for non-finite values)
    keeps_finite: ClassVar[bool] = False
    choices: ClassVar[dict] = {}  # parameter -> its allowed values (checked when the step is made)
    where: str = field(default="preprocess.steps", repr=False, compare=False)

    @property
    def stateful(self) -> bool:
        return False

    def __dask_tokenize__(self):
        # the fitted state (prepare/fit results) is part of what a step computes
        return (type(self).__name__, tokenize(vars(self)))

    def error(self, param: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}.{param}: {message}")

    def check_choice(self, param: str, options: tuple[str, ...]) -> None:
        if getattr(self, param) not in options:
            value = getattr(self, param)
            raise self.error(param, f"must be one of {', '.join(map(str, options))}, got "
                             f"{value!r}{did_you_mean(value, options)}")

    def prepare(self, coords: Coords) -> None:
        self.coords_in = coords

    def output_coords(self) -> Coords:
        return self.coords_in

    def apply(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:  # pos: (pixels, 2) y, x indices
        raise NotImplementedError

    def apply_scaled(self, x: np.ndarray, pos: np.ndarray, writable: bool = False):
        """``apply`` and the per-pixel divisor it applied, if it divides each pixel by one number
        (``normalize``; the preprocess stage keeps the product as ``intensity``), else None.
        ``writable``: x is the chain's own array, the step may overwrite it."""
        return self.apply(x, pos), None

    def state(self) -> dict[str, Any]:
        """What the fit learned, for provenance (JSON-able)."""
        return {}

    # per-pixel maps a step gives beside its output (name -> (long_name, units)); the preprocess
    # stage stores them with its other maps
    maps: ClassVar[dict[str, tuple[str, str]]] = {}

    def apply_maps(self, x: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, dict]:
        """``apply`` and this step's ``maps`` of the block's pixels (float32, one value each)."""
        return self.apply(x, pos), {}


def _axis(coords: Coords, step: Step, param: str) -> tuple[str, np.ndarray]:
    (dim, values), = coords.items()
    if values.size < 2:
        raise step.error(param, f"needs an energy axis of at least 2 channels, got {values.size}")
    return dim, values


@dataclass
class Crop(Step):
    keeps_finite: ClassVar[bool] = True
    name: ClassVar[str] = "crop"
    start: float | None = None
    stop: float | None = None
    ky: list[int] | None = None
    kx: list[int] | None = None

    def prepare(self, coords: Coords) -> None:
        super().prepare(coords)
        if "energy" in coords:
            if self.ky is not None or self.kx is not None:
                raise self.error("ky", "a spectrum scan is cropped by energy: use start/stop "
                                 "(in the energy axis' units)")
            e = coords["energy"]
            lo = -np.inf if self.start is None else float(self.start)
            hi = np.inf if self.stop is None else float(self.stop)
            keep = np.flatnonzero((e >= lo) & (e <= hi))
            if keep.size == 0:
                raise self.error("start", f"range [{lo}, {hi}] keeps no channel of the energy "
                                 f"axis {e[0]:.4g}..{e[-1]:.4g} (ranges are in the axis' units: "
                                 "eV for EELS, keV for EDS)")
            self.index = (slice(keep[0], keep[-1] + 1),)
        else:
            if self.start is not None or self.stop is not None:
                raise self.error("start", "a diffraction scan is cropped by pixel ranges ky/kx")
            self.index = tuple(self._range(d, coords[d].size, getattr(self, d)) for d in ("ky", "kx"))

    def _range(self, dim: str, n: int, r) -> slice:
        if r is None:
            return slice(0, n)
        if len(r) != 2 or not (0 <= int(r[0]) < int(r[1]) <= n):
            raise self.error(dim, f"must be [first, stop) within 0..{n}, got {r}")
        return slice(int(r[0]), int(r[1]))

    def output_coords(self) -> Coords:
        return {d: v[s] for (d, v), s in zip(self.coords_in.items(), self.index)}

    def apply(self, x, pos):
        return x[(slice(None), *self.index)]


@dataclass
class Bin(Step):
    keeps_finite: ClassVar[bool] = True
    name: ClassVar[str] = "bin"
    factor: int = 2

    def prepare(self, coords: Coords) -> None:
        super().prepare(coords)
        if not (isinstance(self.factor, (int, np.integer)) and self.factor >= 1):
            raise self.error("factor", f"must be a positive integer, got {self.factor!r}")
        small = [d for d, v in coords.items() if v.size < self.factor]
        if small:
            raise self.error("factor", f"{self.factor} is larger than the {small[0]} axis")

    def output_coords(self) -> Coords:
        f = self.factor
        return {d: v[: v.size // f * f].reshape(-1, f).mean(axis=1) for d, v in self.coords_in.items()}

    def apply(self, x, pos):
        # sums of strided slices, the last axis first: numpy reduces a short innermost axis
        # (reshape + sum) ~10x slower, and rows of the half-width sums then add contiguously
        # (10 ms per 857 patterns of 128 x 128 against 31 for the four-slice sum). Accumulated
        # in float32: unsigned counts (the chain bins them before any conversion) cannot wrap.
        f = self.factor
        if f == 1:
            return x
        last = x.shape[-1] // f * f
        out = np.add(x[..., 0:last:f], x[..., 1:last:f], dtype=COMPUTE_DTYPE)
        for i in range(2, f):
            out += x[..., i:last:f]
        if x.ndim == 2:
            return out
        rows = x.shape[1] // f * f
        binned = np.add(out[:, 0:rows:f], out[:, 1:rows:f])
        for i in range(2, f):
            binned += out[:, i:rows:f]
        return binned


@dataclass
class MaskChannels(Step):
    keeps_finite: ClassVar[bool] = True
    name: ClassVar[str] = "mask_channels"
    kinds: ClassVar[tuple[str, ...]] = ("spectrum",)
    ranges: list = field(default_factory=list)
    auto: bool = False
    hot_sigma: float = 10.0
    hot_ratio: float = 2.0

    @property
    def stateful(self) -> bool:
        return bool(self.auto)

    def prepare(self, coords: Coords) -> None:
        super().prepare(coords)
        _, e = _axis(coords, self, "ranges")
        drop = np.zeros(e.size, bool)
        for i, r in enumerate(self.ranges):
            r = [r, r] if np.isscalar(r) else list(r)
            if len(r) != 2:
                raise self.error(f"ranges[{i}]", f"must be [lo, hi] or a single energy, got {r}")
            hit = (e >= min(r)) & (e <= max(r))
            if r[0] == r[1]:  # a single energy: the nearest channel
                hit[np.abs(e - r[0]).argmin()] = True
            drop |= hit
        if not self.hot_sigma > 0:
            raise self.error("hot_sigma", f"must be positive, got {self.hot_sigma!r}")
        if not self.hot_ratio >= 1:
            raise self.error("hot_ratio", f"must be at least 1, got {self.hot_ratio!r}")
        self.drop = drop
        self._finish()

    def _finish(self) -> None:
        self.keep = np.flatnonzero(~self.drop)
        if self.keep.size == 0:
            raise self.error("ranges", "every channel is masked")

    def statistics(self, x, valid, pos):
        x = x[valid]
        return {"n": x.shape[0], "sum": x.sum(axis=0, dtype=np.float64)}

    @staticmethod
    def merge(parts):
        return {"n": sum(p["n"] for p in parts), "sum": sum(p["sum"] for p in parts)}

    def fit(self, stats) -> None:
        if stats["n"] == 0:
            raise self.error("auto", "no valid pixel to find dead or hot channels from")
        mean = stats["sum"] / stats["n"]
        dead = mean <= 0
        # a hot channel stands above *both* neighbours by far more than the channel-to-channel
        # steps of the mean spectrum (robust scale); real peaks and edges span several channels
        padded = np.pad(mean, 1, mode="reflect")  # an end channel is compared with its neighbour
        spike = mean - np.maximum(padded[:-2], padded[2:])
        steps = np.diff(mean)
        scale = 1.4826 * np.median(np.abs(steps - np.median(steps)))
        hot = ((spike > self.hot_sigma * max(scale, 1e-9 * max(np.abs(mean).max(), 1e-30)))
               & (mean > self.hot_ratio * np.maximum(padded[:-2], padded[2:])))
        self.dead_channels = np.flatnonzero(dead).tolist()
        self.hot_channels = np.flatnonzero(hot & ~dead).tolist()
        self.drop = self.drop | dead | hot
        self._finish()

    def output_coords(self) -> Coords:
        (dim, e), = self.coords_in.items()
        return {dim: e[self.keep]}

    def apply(self, x, pos):
        return x[:, self.keep]

    def state(self):
        out = {"dropped_channels": int(self.drop.sum())}
        if self.auto:
            out.update(dead_channels=self.dead_channels, hot_channels=self.hot_channels)
        return out


@dataclass
class Background(Step):
    name: ClassVar[str] = "background"
    choices: ClassVar[dict] = {"model": ("power_law",)}
    kinds: ClassVar[tuple[str, ...]] = ("spectrum",)
    window: list[float] | None = None
    model: str = "power_law"

    def prepare(self, coords: Coords) -> None:
        super().prepare(coords)
        _, e = _axis(coords, self, "window")
        if self.window is None or len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise self.error("window", f"must be [lo, hi] with lo < hi (energy axis' units), "
                             f"got {self.window!r}")
        sel = np.flatnonzero((e >= self.window[0]) & (e <= self.window[1]))
        if sel.size < 2:
            raise self.error("window", f"{self.window} holds {sel.size} channel(s) of the energy axis "
                             f"{e[0]:.4g}..{e[-1]:.4g}; need at least 2")
        if e[sel].min() <= 0:
            raise self.error("window", "a power law needs positive energies")
        self.sel = sel
        self.log_e = np.log(e[sel]).astype(np.float64)
        # a power law means nothing at E <= 0 (an EDS axis may start below zero): no background
        self.positive = e > 0
        self.log_e_all = np.log(np.where(self.positive, e, 1.0)).astype(np.float64)

    def apply(self, x, pos):
        # least squares of log(counts) = a - r log(E) in the window, per pixel, in closed form
        y = np.log(np.clip(x[:, self.sel], 1.0, None), dtype=np.float64)
        le = self.log_e
        le_c = le - le.mean()
        slope = (y - y.mean(axis=1, keepdims=True)) @ le_c / (le_c @ le_c)
        intercept = y.mean(axis=1) - slope * le.mean()
        background = np.exp(intercept[:, None] + slope[:, None] * self.log_e_all[None, :])
        background[:, ~self.positive] = 0
        return (x - background).astype(COMPUTE_DTYPE)


def _centre(shape) -> tuple[float, float]:
    return (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0


def _radius_grid(shape) -> np.ndarray:
    cy, cx = _centre(shape)
    ky, kx = np.ogrid[: shape[0], : shape[1]]
    return np.hypot(ky - cy, kx - cx)


def _centre_of_mass(x: np.ndarray, radius: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Centre of mass (ky, kx) of each pattern of ``x`` (pixels, ky, kx), NaN where empty."""
    w = x if radius is None else x * (_radius_grid(x.shape[1:]) <= radius)
    if w.size and w.min() < 0:  # counts are not negative: no copy unless needed
        w = np.clip(w, 0, None)
    # profiles in float32 (sums of one row or column), the total in float64
    rows, cols = w.sum(axis=2), w.sum(axis=1)
    total = rows.sum(axis=1, dtype=np.float64)
    ky = np.arange(x.shape[1], dtype=np.float64)
    kx = np.arange(x.shape[2], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rows @ ky) / total, (cols @ kx) / total


def shift_patterns(x: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Move each pattern by (-dy, -dx) pixels, bilinear, zero outside: out[k] = x[k + d].

    A pattern's shift is an integer part and a fraction: the four bilinear neighbours are four
    slices of the pattern offset by the integer part, weighted by the fraction. Patterns that
    share an integer part (a beam wandering a pixel or two: a few groups) are shifted together,
    as slices of one array, not gathered element by element (16 ms per 857 patterns of 64 x 64
    against 94)."""
    n, a, b = x.shape
    iy, ix = np.floor(dy), np.floor(dx)
    fy = (np.asarray(dy) - iy).astype(np.float32)[:, None, None]
    fx = (np.asarray(dx) - ix).astype(np.float32)[:, None, None]
    # beyond a pattern's size every neighbour is outside: those shifts are all the same
    iy = np.clip(iy, -a - 1, a).astype(np.int64)
    ix = np.clip(ix, -b - 1, b).astype(np.int64)
    out = np.zeros(x.shape, np.float32)
    groups = (iy + a + 1) * (2 * b + 2) + (ix + b + 1)  # one key per integer shift
    order = np.argsort(groups, kind="stable")
    starts = np.flatnonzero(np.diff(groups[order], prepend=groups[order[0]] - 1) if n else [])
    for first, end in zip(starts, [*starts[1:], n]):
        members = order[first:end]
        whole = len(members) == n
        xs, acc = (x, out) if whole else (x[members], np.zeros((len(members), a, b), np.float32))
        ty0, tx0 = int(iy[members[0]]), int(ix[members[0]])
        wy1, wx1 = (fy, fx) if whole else (fy[members], fx[members])
        for ty, wy in ((ty0, 1 - wy1), (ty0 + 1, wy1)):
            r0, r1 = max(0, -ty), min(a, a - ty)
            for tx, wx in ((tx0, 1 - wx1), (tx0 + 1, wx1)):
                c0, c1 = max(0, -tx), min(b, b - tx)
                if r0 < r1 and c0 < c1:
                    acc[:, r0:r1, c0:c1] += (wy * wx) * xs[:, r0 + ty:r1 + ty, c0 + tx:c1 + tx]
        if not whole:
            out[members] = acc
    return out


@dataclass
class Centre(Step):
    name: ClassVar[str] = "centre"
    choices: ClassVar[dict] = {"method": ("com", "fit")}
    kinds: ClassVar[tuple[str, ...]] = ("diffraction",)
    method: str = "com"
    radius: float | None = None

    @property
    def stateful(self) -> bool:
        return self.method == "fit"

    def prepare(self, coords: Coords) -> None:
        super().prepare(coords)
        if self.radius is not None and not self.radius > 0:
            raise self.error("radius", f"must be positive, got {self.radius!r}")

    def statistics(self, x, valid, pos):
        cy, cx = _centre_of_mass(x, self.radius)
        ok = valid & np.isfinite(cy) & np.isfinite(cx)
        a = np.column_stack([np.ones(ok.sum()), pos[ok].astype(np.float64)])
        return {"ata": a.T @ a, "atb": a.T @ np.column_stack([cy[ok], cx[ok]])}

    @staticmethod
    def merge(parts):
        return {k: sum(p[k] for p in parts) for k in ("ata", "atb")}

    def fit(self, stats) -> None:
        if np.linalg.matrix_rank(stats["ata"]) < 3:
            raise self.error("method", "'fit' needs a scan of at least 2 x 2 pixels with signal")
        self.plane = np.linalg.solve(stats["ata"], stats["atb"])  # rows: 1, y, x; cols: cy, cx

    def apply(self, x, pos):
        cy0, cx0 = _centre(x.shape[1:])
        if self.method == "com":
            cy, cx = _centre_of_mass(x, self.radius)
            cy, cx = np.nan_to_num(cy, nan=cy0), np.nan_to_num(cx, nan=cx0)
        else:
            c = np.column_stack([np.ones(len(pos)), pos.astype(np.float64)]) @ self.plane
            cy, cx = c[:, 0], c[:, 1]
        return shift_patterns(x, cy - cy0, cx - cx0)

    def state(self):
        return {"origin_plane": self.plane.tolist()} if self.method == "fit" else {}


@dataclass
class CircularCrop(Step):
    keeps_finite: ClassVar[bool] = True
    name: ClassVar[str] = "circular_crop"
    kinds: ClassVar[tuple[str, ...]] = ("diffraction",)
    radius: float = 0.0
    inside: ClassVar[bool] = False  # zero what lies outside the radius

    def prepare(self, coords: Coords) -> None:
        super().prepare(coords)
        if not self.radius > 0:
            raise self.error("radius", f"must be positive (pixels), got {self.radius!r}")
        r = _radius_grid(tuple(v.size for v in coords.values()))
        self.zero = (r <= self.radius) if self.inside else (r > self.radius)

    def apply(self, x, pos):
        return np.where(self.zero, 0, x).astype(COMPUTE_DTYPE)


@dataclass
class BeamMask(CircularCrop):
    name: ClassVar[str] = "beam_mask"
    inside: ClassVar[bool] = True


@dataclass
class Scale(Step):
    name: ClassVar[str] = "scale"
    choices: ClassVar[dict] = {"method": ("log", "sqrt")}
    method: str = "log"

    def prepare(self, coords: Coords) -> None:
        super().prepare(coords)

    def apply(self, x, pos):
        x = np.maximum(x, 0)
        if self.method == "sqrt":
            return np.sqrt(x, out=x)
        # log(1 + x) in place: numpy's log is vectorised, its log1p is not (70 -> 14 ms per
        # block of 988 noisy 64 x 64 patterns); the counts are >= 0, where float32's 1 + x
        # loses nothing that matters (2e-7 at most)
        x += np.float32(1)
        return np.log(x, out=x)


@dataclass
class Anscombe(Step):
    name: ClassVar[str] = "anscombe"

    def apply(self, x, pos):
        return 2.0 * np.sqrt(np.clip(x, 0, None) + np.float32(3 / 8))


@dataclass
class PoissonWeight(Step):
    name: ClassVar[str] = "poisson_weight"

    @property
    def stateful(self) -> bool:
        return True

    def statistics(self, x, valid, pos):
        x = x[valid]
        x = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))
        return {"n": x.shape[0], "sum": x.sum(axis=0, dtype=np.float64)}

    merge = staticmethod(MaskChannels.merge)

    def fit(self, stats) -> None:
        if stats["n"] == 0:
            raise self.error("poisson_weight", "no valid pixel to estimate the mean signal from")
        self.mean_signal = stats["sum"] / stats["n"]
        self.mean_total = float(self.mean_signal.sum())
        h = np.clip(self.mean_signal, 0, None)
        with np.errstate(divide="ignore"):
            self.h_inv_sqrt = np.where(h > 0, 1 / np.sqrt(h), 0).astype(np.float32)
        if self.mean_total <= 0:
            raise self.error("poisson_weight", "the mean signal is not positive: weight raw counts, "
                             "before background subtraction or normalisation")

    def apply(self, x, pos):
        flat = x.reshape(x.shape[0], -1)
        g = np.clip(flat.sum(axis=1, dtype=np.float64) / self.mean_total, 0, None)
        with np.errstate(divide="ignore"):
            g_inv_sqrt = np.where(g > 0, 1 / np.sqrt(g), 0).astype(np.float32)
        return (flat * g_inv_sqrt[:, None] * self.h_inv_sqrt[None, :]).reshape(x.shape)

    def state(self):
        return {"mean_total": self.mean_total}


@dataclass
class Normalize(Step):
    keeps_finite: ClassVar[bool] = True
    name: ClassVar[str] = "normalize"
    choices: ClassVar[dict] = {"method": ("sum", "max", "none")}
    method: str = "sum"

    def prepare(self, coords: Coords) -> None:
        super().prepare(coords)

    def apply(self, x, pos):
        return self.apply_scaled(x, pos)[0]

    def apply_scaled(self, x, pos, writable=False):
        if self.method == "none":
            return x, None
        flat = x.reshape(x.shape[0], -1)
        # contiguous rows first: a row reduction and a product over a cropped view are ~3x
        # slower than the copy they avoid
        rows = np.ascontiguousarray(flat)
        norm = rows.sum(axis=1) if self.method == "sum" else rows.max(axis=1)
        divisor = np.where(norm > 0, norm, 1).astype(COMPUTE_DTYPE)
        # a multiplication by the reciprocal is cheaper than a division per value; in place
        # (no new block to fault in) on the chain's own array or the copy made here
        scale = (1 / divisor)[:, None]
        own = (writable or rows is not flat) and rows.dtype == COMPUTE_DTYPE
        out = np.multiply(rows, scale, out=rows) if own else rows * scale
        return out.reshape(x.shape), divisor


@dataclass
class Polar(Step):
    """Rotation-invariant diffraction features. Each pattern is resampled on a polar grid about
    its centre (bilinear, out to the inscribed circle; put ``centre`` before it), then the
    magnitudes of its Fourier series along the angle are kept, harmonics 0..``harmonics``: an
    in-plane rotation of the crystal shifts the angle, which changes only the phases of that
    series. Grains of one phase in different orientations then have the same features (the aim
    of atomai's rotation-invariant VAE, here by a fixed transform), and the signal shrinks from
    ky x kx to radius x harmonic. Harmonic 0 is the azimuthal mean (the radial profile)."""

    keeps_finite: ClassVar[bool] = True
    name: ClassVar[str] = "polar"
    kinds: ClassVar[tuple[str, ...]] = ("diffraction",)
    radii: int | None = None  # radial samples; null: half the pattern's smaller side
    angles: int = 64
    harmonics: int = 16

    def __post_init__(self) -> None:
        # (checked when the step is made: before a cluster starts or a scan is read)
        if self.radii is not None and not (isinstance(self.radii, int) and self.radii >= 2):
            raise self.error("radii", f"must be an integer of at least 2, got {self.radii!r}")
        if not (isinstance(self.angles, int) and self.angles >= 4 and self.angles % 2 == 0):
            raise self.error("angles", f"must be an even integer >= 4, got {self.angles!r}")
        if not (isinstance(self.harmonics, int) and 0 <= self.harmonics <= self.angles // 2):
            raise self.error("harmonics", f"must be an integer within 0..{self.angles // 2} "
                             f"(angles / 2), got {self.harmonics!r}")

    def prepare(self, coords: Coords) -> None:
        import scipy.sparse

        super().prepare(coords)
        (_, ky), (_, kx) = coords.items()
        cy, cx = _centre((ky.size, kx.size))
        n_r = (min(ky.size, kx.size) // 2) if self.radii is None else self.radii
        if n_r < 2:
            raise self.error("radii", f"a {ky.size} x {kx.size} pattern has fewer than 2 radii")
        rho = np.linspace(0.0, min(cy, cx), n_r)
        theta = 2 * np.pi * np.arange(self.angles) / self.angles
        y = (cy + rho[:, None] * np.sin(theta)[None, :]).ravel()
        x = (cx + rho[:, None] * np.cos(theta)[None, :]).ravel()
        y0 = np.clip(np.floor(y).astype(np.int64), 0, ky.size - 2)
        x0 = np.clip(np.floor(x).astype(np.int64), 0, kx.size - 2)
        fy, fx = y - y0, x - x0
        # the bilinear resampling as a sparse (pattern pixels x samples) matrix, four weights a
        # sample (one sparse product: 29 ms per block of 988 patterns against 78 for gathers)
        index = np.concatenate([y0 * kx.size + x0, (y0 + 1) * kx.size + x0,
                                y0 * kx.size + x0 + 1, (y0 + 1) * kx.size + x0 + 1])
        weight = np.concatenate([(1 - fy) * (1 - fx), fy * (1 - fx), (1 - fy) * fx, fy * fx])
        sample = np.tile(np.arange(len(y)), 4)
        self.resample = scipy.sparse.csr_matrix((weight.astype(COMPUTE_DTYPE), (index, sample)),
                                                shape=(ky.size * kx.size, len(y)))
        # the angular Fourier series up to ``harmonics`` as one real matrix (cos, -sin columns:
        # numpy's rfft convention): a GEMM of the kept harmonics only, 4x faster than the FFT
        m = np.arange(self.harmonics + 1)
        turn = theta[:, None] * m[None, :]
        self.fourier = np.concatenate([np.cos(turn), -np.sin(turn)], axis=1).astype(COMPUTE_DTYPE)
        step = float(ky[1] - ky[0]) if ky.size > 1 else 1.0
        self.radius_values = (rho * step).astype(np.float64)

    maps: ClassVar[dict[str, tuple[str, str]]] = {
        "orientation": ("in-plane orientation: the phase of the strongest angular harmonic m "
                        "(m >= 2) on its strongest ring, over m; relative within a phase "
                        "(the same crystal turned by a gives a + constant), modulo 360/m",
                        "degree"),
        "symmetry": ("the angular harmonic m of the orientation (6: a six-fold pattern)", ""),
    }

    def output_coords(self) -> Coords:
        return {"radius": self.radius_values, "harmonic": np.arange(self.harmonics + 1)}

    def apply(self, x, pos):
        return self.apply_maps(x, pos)[0]

    def apply_maps(self, x, pos):
        flat = x.reshape(len(x), -1)
        n_r = len(self.radius_values)
        out = np.empty((len(x), n_r, self.harmonics + 1), COMPUTE_DTYPE)
        orientation = np.full(len(x), np.nan, COMPUTE_DTYPE)
        symmetry = np.zeros(len(x), COMPUTE_DTYPE)
        h = self.harmonics + 1
        rows = max(1, (8 << 20) // (4 * self.resample.shape[1]))  # 8 MiB of samples at a time
        for start in range(0, len(x), rows):
            part = flat[start:start + rows]
            samples = np.asarray(part @ self.resample, COMPUTE_DTYPE)  # (rows, radius x angle)
            series = (samples.reshape(-1, self.angles) @ self.fourier).reshape(len(part), n_r, 2 * h)
            re, im = series[..., :h], series[..., h:]
            out[start:start + rows] = np.sqrt(re * re + im * im) / self.angles
            if self.harmonics >= 2:
                orientation[start:start + rows], symmetry[start:start + rows] = \
                    _orientation(re + 1j * im)
        return out, {"orientation": orientation, "symmetry": symmetry}


def _orientation(spectrum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, from its angular Fourier series (pixels, radius, harmonic): the harmonic m >= 2
    with the most power over the rings, and -arg(c_m) / m in degrees modulo 360 / m on the ring
    where it is strongest (turning the pattern by a multiplies c_m by exp(-i m a))."""
    power = np.abs(spectrum[:, :, 2:]) ** 2
    m = 2 + power.sum(axis=1).argmax(axis=1)
    rows = np.arange(len(spectrum))
    ring = np.abs(spectrum[rows, :, m]).argmax(axis=1)
    coefficient = spectrum[rows, ring, m]
    period = 360.0 / m
    angle = np.mod(-np.degrees(np.angle(coefficient)) / m, period)
    return angle.astype(COMPUTE_DTYPE), m.astype(COMPUTE_DTYPE)


STEPS: dict[str, type[Step]] = {s.name: s for s in (
    Crop, Bin, MaskChannels, Background, Centre, CircularCrop, BeamMask, Scale, Anscombe,
    PoissonWeight, Normalize, Polar)}


# both spellings are accepted (British and American users write both); the first is stored
SPELLINGS = {"center": "centre", "normalise": "normalize"}


def make_step(spec: dict | Step, index: int, kind: str | None) -> Step:
    """A step from its config mapping ``{"step": NAME, **parameters}``."""
    where = f"preprocess.steps[{index}]"
    if isinstance(spec, Step):  # a copy: fitting must not change a chain built before
        step = dataclasses.replace(spec, where=where)
    else:
        if not isinstance(spec, dict) or "step" not in spec:
            raise ConfigError(f"{where}: must be a mapping with a 'step' key, got {spec!r}")
        params = dict(spec)
        name = params.pop("step")
        name = SPELLINGS.get(name, name)
        if name not in STEPS:
            raise ConfigError(f"{where}.step: must be one of {', '.join(sorted(STEPS))}, got "
                              f"{name!r}{did_you_mean(name, [*STEPS, *SPELLINGS])}")
        cls = STEPS[name]
        known = {f.name for f in dataclasses.fields(cls) if f.name != "where"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError("; ".join(
                f"{where}.{u}: unknown parameter of step {name!r}"
                f"{did_you_mean(u, known) or f' (its parameters: {sorted(known)})'}"
                for u in unknown))
        step = cls(**params, where=where)
    for param, options in step.choices.items():
        step.check_choice(param, options)
    if kind is not None and kind not in step.kinds:
        raise ConfigError(f"{where}.step: {step.name!r} does not apply to a {kind} scan")
    return step
