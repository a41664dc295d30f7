"""Synthetic EDS (energy-dispersive X-ray) spectrum images: an aged stainless steel with sigma-phase
and carbide precipitates and a chromium-oxide surface layer, as a 200 kV TEM with a silicon drift
detector records it.

Four phases with distinct compositions (atomic fractions below): austenite (Fe, Cr 19 %, Ni 10 %),
sigma phase (the Fe-Cr-Mo intermetallic: Cr 42 %, little Ni), M23C6 carbide (Cr-rich, C, Mo) and
a Cr2O3 surface layer. (Ferrite, Cr 26 % and Ni 4 %, was tried in place of sigma: with the mixed
pixels at grain boundaries, k-means on the noise-free spectra found it at ARI 0.64-0.70 only.)
Each element gives its characteristic lines at their tabulated energies (K-alpha, K-beta,
L-alpha), as Gaussians whose width grows with energy as a silicon detector's does (Fano
statistics plus electronic noise: FWHM^2 = 42^2 + 2.562 E, in eV: 130 eV at Mn K-alpha); on a
Kramers bremsstrahlung continuum ~ Zbar (E0 - E) / E. Low energies are absorbed by the detector
window (fixed) and by the specimen (~ thickness / E^3: the C and O K lines and the L lines fade
where the foil is thicker, a non-linear variation inside a phase); high energies pass through the
thin silicon crystal undetected. A grid's Cu lines sit in every spectrum, and the detector's
zero-energy noise peak at 0 keV (the axis starts at -0.2 keV, as real detectors' offsets do).

Grains (Voronoi, mixed pixels at boundaries, the surface layer along the top edge) carry the phases,
each grain with its own composition, a few per cent off its phase's; the thickness is a smooth
field. Optional anomalies (label -1): gallium implanted by the FIB (Ga K and L lines) and silica
particles (Si and more O). Counts are Poisson (a pulse-counting detector: no read noise). The energy
axis is in keV (``units`` attr): crop ranges on these scans are in keV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from emscale.errors import ConfigError
from emscale.store import ChunkPolicy
from emscale.synth import SpectrumImage, checked_outline, count_dtype_for, lazy_scan
from emscale.synth.layout import AnomalyBlobs, BandLayout, GrainLayout, SmoothField, block_coords

SLAB_PIXELS = 1024
BEAM_KEV = 200.0

# element: (Z, relative detection per atom, [(line energy keV, relative weight), ...])
ELEMENTS: dict[str, tuple[int, float, list[tuple[float, float]]]] = {
    "C": (6, 0.25, [(0.277, 1.0)]),
    "O": (8, 0.45, [(0.525, 1.0)]),
    "Si": (14, 0.9, [(1.740, 1.0)]),
    "Cr": (24, 1.0, [(5.415, 0.87), (5.947, 0.13), (0.573, 0.15)]),
    "Mn": (25, 1.0, [(5.899, 0.87), (6.490, 0.13), (0.637, 0.15)]),
    "Fe": (26, 1.0, [(6.404, 0.87), (7.058, 0.13), (0.705, 0.15)]),
    "Ni": (28, 1.0, [(7.478, 0.87), (8.265, 0.13), (0.852, 0.15)]),
    "Cu": (29, 1.0, [(8.048, 0.87), (8.905, 0.13), (0.930, 0.15)]),
    "Ga": (31, 1.0, [(9.251, 0.87), (10.264, 0.13), (1.098, 0.2)]),
    "Mo": (42, 0.8, [(2.293, 1.0), (17.479, 0.45), (19.608, 0.08)]),
}
ELEMENT_NAMES = tuple(ELEMENTS)

# atomic fractions per phase (the remainder of nothing: each sums to 1)
PHASES: dict[str, dict[str, float]] = {
    "austenite": {"Fe": 0.69, "Cr": 0.19, "Ni": 0.10, "Mn": 0.02},
    "sigma": {"Fe": 0.50, "Cr": 0.42, "Mo": 0.07, "Ni": 0.01},
    "M23C6 carbide": {"Cr": 0.55, "Fe": 0.15, "Mo": 0.08, "C": 0.22},
    "Cr2O3 surface": {"Cr": 0.36, "Fe": 0.04, "O": 0.60},
}
PHASE_PROBABILITY = (0.45, 0.35, 0.20, 0.0)  # of a grain's phase (the surface is a layer)
ANOMALIES = ("none", "Ga implantation (FIB)", "silica particle")
GRID_CU = 0.01  # the grid's Cu lines: a fixed share in every spectrum
ZERO_PEAK = 0.03  # the detector's noise peak at 0 keV, as a share of the dose
BACKGROUND = 0.35  # the continuum's counts over the lines' (austenite, mean thickness)


def fwhm_kev(energy_kev) -> np.ndarray:
    """A silicon drift detector's line width: electronic noise (42 eV) and Fano statistics
    (F = 0.12, 3.85 eV per electron-hole pair): 130 eV at Mn K-alpha (5.9 keV)."""
    return np.sqrt(42.0**2 + 2.355**2 * 0.12 * 3.85 * 1000.0 * np.asarray(energy_kev)) / 1000.0


@dataclass
class EDSGenerator(SpectrumImage):
    """Stainless-steel EDS spectrum images; see the module docstring for the physics."""

    shape: tuple[int, int] = (64, 64)
    channels: int = 1024
    energy_range: tuple[float, float] = (-0.2, 20.0)  # keV
    dose: float = 1000.0  # mean counts per spectrum (austenite, mean thickness)
    read_noise: float = 0.0  # pulse counting
    anomaly: bool = False
    seed: int = 0
    grain_size: float | None = None
    layout: str = "grains"  # or "bands": equal bands of pure pixels, one per phase
    kind: str = field(default="spectrum", init=False)

    def __post_init__(self) -> None:
        self.shape = checked_outline(self.shape, self.channels)
        lo, hi = (float(v) for v in self.energy_range)
        if not (lo < 5.2 and hi > 7.6):
            raise ConfigError(f"energy_range: must cover 5.2-7.6 keV (the Cr, Fe and Ni K lines), "
                              f"got {lo}-{hi}")
        if not self.dose > 0:
            raise ConfigError(f"dose: must be positive, got {self.dose}")
        if self.read_noise < 0:
            raise ConfigError(f"read_noise: must be >= 0, got {self.read_noise}")
        if self.layout not in ("grains", "bands"):
            raise ConfigError(f"layout: must be 'grains' or 'bands', got {self.layout!r}")
        self.energy_range = (lo, hi)
        self.signal_shape = (self.channels,)
        self.energy = np.linspace(lo, hi, self.channels, dtype=np.float64)
        self.phase_names = list(PHASES)
        n = len(PHASES)
        if self.layout == "bands":
            if self.shape[0] < n:
                raise ConfigError(f"shape: the bands layout needs {n} rows at least")
            self.phase_layout = BandLayout(self.shape, n)
        else:
            self.phase_layout = GrainLayout(self.shape, n, self.seed, grain_size=self.grain_size,
                                            boundary=1.5, phase_probability=PHASE_PROBABILITY,
                                            surface_phase=n - 1)
        self.thickness = SmoothField(self.shape, self.seed + 11,
                                     wavelength=max(8.0, max(self.shape) / 1.5))
        rng = np.random.default_rng([self.seed, 404])
        # each grain's composition a few per cent off its phase's, element by element
        self.grain_jitter = np.exp(rng.normal(0.0, 0.04,
                                              (self.phase_layout.n_grains, len(ELEMENTS))))
        self.blobs = (AnomalyBlobs(self.shape, len(ANOMALIES) - 1, self.seed) if self.anomaly
                      else None)
        self._build_tables()

    # --- the spectral model -----------------------------------------------------------------
    def _build_tables(self) -> None:
        e = self.energy
        step = float(e[1] - e[0])
        # per element: its lines (counts per atom fraction, per channel), float64 then float32
        lines = np.zeros((len(ELEMENTS), self.channels))
        for i, (_z, detect, table) in enumerate(ELEMENTS.values()):
            for centre, weight in table:
                sigma = fwhm_kev(centre) / 2.355
                lines[i] += detect * weight * step / (sigma * np.sqrt(2 * np.pi)) \
                    * np.exp(-0.5 * ((e - centre) / sigma) ** 2)
        self._lines = lines
        self._z = np.array([z for z, _d, _t in ELEMENTS.values()], dtype=np.float64)
        safe = np.maximum(e, 0.05)
        kramers = np.where(e > 0.05, (BEAM_KEV - safe) / safe, 0.0) * step
        self._window = np.exp(-((0.35 / safe) ** 3)) * (1.0 - np.exp(-((12.0 / safe) ** 3)))
        self._specimen = 0.05 / safe**3  # absorption per unit thickness
        self._comp = np.array([[p.get(el, 0.0) for el in ELEMENTS] for p in PHASES.values()])
        ref = self._comp[0]
        lines_ref = float((ref @ lines * self._window * np.exp(-self._specimen)).sum())
        brems_ref = float((kramers * self._window * np.exp(-self._specimen)).sum())
        # continuum per unit of mean Z: BACKGROUND of the lines' counts for the reference phase
        self._kramers = kramers * BACKGROUND * lines_ref / (brems_ref * float(ref @ self._z))
        sigma0 = fwhm_kev(0.0) / 2.355
        self._zero = step / (sigma0 * np.sqrt(2 * np.pi)) * np.exp(-0.5 * (e / sigma0) ** 2)
        self._scale = self.dose / (lines_ref * (1.0 + BACKGROUND))
        peak = self._scale * 1.5 * (self._comp @ self._lines).max() \
            + ZERO_PEAK * self.dose * self._zero.max()
        self.count_dtype = count_dtype_for(4.0 * peak)

    def _composition(self, y: np.ndarray, x: np.ndarray):
        """Per pixel: phase weights, atomic fractions (n, elements), thickness, anomaly kind."""
        weights, g1, g2, mix = self.phase_layout.evaluate(y, x)
        jitter = (1.0 - mix)[:, None] * self.grain_jitter[g1] + mix[:, None] * self.grain_jitter[g2]
        comp = (weights @ self._comp) * jitter
        kind = self.blobs.kind_at(y, x) if self.blobs is not None else np.zeros(len(y), np.int8)
        if kind.any():
            ga, si, o = (ELEMENT_NAMES.index(n) for n in ("Ga", "Si", "O"))
            comp[kind == 1, ga] += 0.08
            particle = kind == 2
            comp[particle] *= 0.4
            comp[particle, si] += 0.6 / 3
            comp[particle, o] += 0.6 * 2 / 3
        comp = comp / comp.sum(axis=1, keepdims=True)
        comp[:, ELEMENT_NAMES.index("Cu")] += GRID_CU
        t = 1.0 + 0.4 * self.thickness(y, x)  # relative thickness 0.6 .. 1.4
        return weights, comp, t, kind

    def _spectra(self, comp: np.ndarray, t: np.ndarray) -> np.ndarray:
        # float32 per pixel and channel (the tables are float64): the model needs no more
        f32 = np.float32
        comp, t = comp.astype(f32), t.astype(f32)[:, None]
        out = comp @ self._lines.astype(f32)
        out += (comp @ self._z.astype(f32))[:, None] * self._kramers.astype(f32)
        out *= np.exp(-t * self._specimen.astype(f32))
        out *= (self._scale * t) * self._window.astype(f32)
        out += f32(ZERO_PEAK * self.dose) * self._zero.astype(f32)
        return out

    # --- the Generator protocol -------------------------------------------------------------
    def clean_block(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.clean_at(*block_coords(y0, y1, x0, x1)).reshape(y1 - y0, x1 - x0, self.channels)

    def clean_at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Expected counts at scan positions ``y``, ``x`` (flat), float32 ``(n, channels)``."""
        out = np.empty((len(y), self.channels), dtype=np.float32)
        # in slabs of pixels: the temporaries stay a few MB whatever the block
        for i in range(0, len(y), SLAB_PIXELS):
            s = slice(i, i + SLAB_PIXELS)
            _w, comp, t, _k = self._composition(y[s], x[s])
            out[s] = self._spectra(comp, t)
        return out

    def truth_block(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        y, x = block_coords(y0, y1, x0, x1)
        weights, _g1, _g2, _mix = self.phase_layout.evaluate(y, x)
        kind = self.blobs.kind_at(y, x) if self.blobs is not None else np.zeros(len(y), np.int8)
        label = weights.argmax(axis=1).astype(np.int16)
        label[kind > 0] = -1
        shape = (y1 - y0, x1 - x0)
        return label.reshape(shape), kind.reshape(shape)

    def purity_block(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The majority phase's weight per pixel (1: a pure pixel; about 0.5 on a boundary)."""
        weights = self.phase_layout.evaluate(*block_coords(y0, y1, x0, x1))[0]
        return weights.max(axis=1).reshape(y1 - y0, x1 - x0)

    def coords(self) -> dict[str, Any]:
        coords = super().coords()
        coords["energy"] = ("energy", self.energy, {"units": "keV", "long_name": "X-ray energy"})
        return coords

    def attrs(self) -> dict[str, Any]:
        attrs = {
            "kind": "spectrum",
            "signal_type": "EDS",
            "synthetic": True,
            "source": {"path": None, "generator": "emscale synth eds"},
            "generator": {"name": "eds", **self.parameters()},
            "phase_names": self.phase_names,
            "phase_compositions": {name: dict(c) for name, c in PHASES.items()},
        }
        if self.anomaly:
            attrs["anomaly_names"] = list(ANOMALIES)
        return attrs


def synth_eds(shape=(64, 64), channels: int = 1024, anomaly: bool = False, seed: int = 0,
              dose: float = 1000.0, policy: ChunkPolicy | None = None, store_clean: bool = False,
              **kwargs) -> xr.Dataset:
    """A lazy synthetic EDS spectrum image (keV axis); write it with ``emscale.store.write_scan``
    (``store_clean``: keep the clean signal in the store, else it is regenerated when read)."""
    gen = EDSGenerator(shape=tuple(shape), channels=channels, anomaly=anomaly, seed=seed, dose=dose,
                       **kwargs)
    return lazy_scan(gen, policy, store_clean)
