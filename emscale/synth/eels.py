"""Synthetic iron-oxide core-loss EELS spectrum images (O-K and Fe-L2,3 edges).

Four phases differ the way real iron oxides do: the Fe-L3 white line moves up and gains a
low-energy shoulder from Fe2+ to Fe3+, the L3/L2 intensity ratio rises with the Fe3+ fraction, the
O-K pre-peak (O 2p - Fe 3d hybridisation, ~530 eV) grows with Fe3+, and the O/Fe ratio follows the
stoichiometry. The fourth phase is an amorphous surface layer (oxy-hydroxide-like): broad lines, no
crystal-field fine structure, more oxygen.

Inside a phase the spectra vary non-linearly: the local thickness (t/lambda, a smooth field) sets the
single-scattering intensity t*exp(-t), the background slope and plural scattering (a plasmon replica
of the edges, weight ~t, plus line broadening); the Fe-L edge position shifts by a few tenths of an
eV (smooth field plus a per-grain offset). Grains (Voronoi) carry the phases with mixed pixels at
boundaries. Optional anomalies: fluorine contamination (an F-K edge at 685 eV on a thicker
hydrocarbon background) and beam damage (Fe reduced towards Fe2+, oxygen lost, molecular O2 with its
sharp pi* peak at 531 eV). Shot noise at the chosen dose plus Gaussian read noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr
from scipy.signal import fftconvolve

from emscale.errors import ConfigError
from emscale.store import ChunkPolicy
from emscale.synth import SpectrumImage, checked_outline, count_dtype_for, lazy_scan
from emscale.synth.layout import (
    AnomalyBlobs,
    BandLayout,
    GrainLayout,
    SmoothField,
    block_coords,
)

PLASMON_EV = 22.0
PLASMON_FWHM = 8.0
SLAB_PIXELS = 1024

# Per phase: Fe and O content (relative edge strengths), Fe-L3 main line (eV), shoulder offset and
# weight (Fe3+ crystal-field splitting), L3/L2 ratio, line width (eV), O-K pre-peak weight.
PHASES: dict[str, dict[str, float]] = {
    "Fe2O3": dict(fe=0.40, o=0.60, l3=709.6, shoulder=-1.5, shoulder_w=0.45, ratio=5.4, width=1.0, o_pre=0.85),
    "FeO": dict(fe=0.50, o=0.50, l3=707.9, shoulder=+1.6, shoulder_w=0.12, ratio=4.1, width=1.2, o_pre=0.15),
    "Fe3O4": dict(fe=0.43, o=0.57, l3=708.7, shoulder=-1.3, shoulder_w=0.30, ratio=4.8, width=1.1, o_pre=0.50),
    "surface": dict(fe=0.30, o=0.70, l3=709.2, shoulder=-1.4, shoulder_w=0.10, ratio=4.4, width=2.3, o_pre=0.30),
}
ANOMALIES = ("none", "F contamination", "beam damage")


def _lorentz(e: np.ndarray, centre, width) -> np.ndarray:
    return 1.0 / (1.0 + ((e - centre) / (0.5 * width)) ** 2)


def _gauss(e: np.ndarray, centre, sigma) -> np.ndarray:
    return np.exp(-0.5 * ((e - centre) / sigma) ** 2)


def _step(e: np.ndarray, onset, width) -> np.ndarray:
    """An edge onset: a smooth rise to 1 followed by the slow hydrogenic decay of the continuum."""
    rise = 0.5 + np.arctan((e - onset) / width) / np.pi
    return rise * np.clip(e / onset, 1.0, None) ** -2.5


@dataclass
class EELSGenerator(SpectrumImage):
    """Iron-oxide core-loss spectrum images; see the module docstring for the physics."""

    shape: tuple[int, int] = (64, 64)
    channels: int = 1024
    energy_range: tuple[float, float] = (480.0, 800.0)
    dose: float = 50.0
    read_noise: float = 1.0
    anomaly: bool = False
    seed: int = 0
    grain_size: float | None = None
    # "grains": Voronoi grains with mixed boundaries and a surface band; "bands": equal bands of
    # pure pixels, one per phase in PHASES order (groups of known phase: emscale bench quality)
    layout: str = "grains"
    kind: str = field(default="spectrum", init=False)

    def __post_init__(self) -> None:
        self.shape = checked_outline(self.shape, self.channels)
        lo, hi = self.energy_range
        if not (lo < 520.0 and hi > 735.0):
            raise ConfigError(f"energy_range: must cover 520-735 eV (O-K and Fe-L edges), got {lo}-{hi}")
        if not self.dose > 0:
            raise ConfigError(f"dose: must be positive, got {self.dose}")
        if self.read_noise < 0:
            raise ConfigError(f"read_noise: must be >= 0, got {self.read_noise}")
        self.signal_shape = (self.channels,)
        self.energy = np.linspace(lo, hi, self.channels, dtype=np.float64)
        self.phase_names = list(PHASES)
        if self.layout not in ("grains", "bands"):
            raise ConfigError(f"layout: must be 'grains' or 'bands', got {self.layout!r}")
        if self.layout == "bands":
            if self.shape[0] < len(PHASES):
                raise ConfigError(f"shape: the bands layout needs {len(PHASES)} rows at least")
            self.phase_layout = BandLayout(self.shape, len(PHASES))
        else:
            self.phase_layout = GrainLayout(self.shape, len(PHASES), self.seed,
                                            grain_size=self.grain_size, boundary=1.5,
                                            surface_phase=self.phase_names.index("surface"))
        span = max(self.shape)
        self.thickness = SmoothField(self.shape, self.seed + 11, wavelength=max(8.0, span / 1.5))
        self.shift = SmoothField(self.shape, self.seed + 13, wavelength=max(6.0, span / 3.0))
        rng = np.random.default_rng([self.seed, 303])
        self.grain_shift = rng.normal(0.0, 0.12, self.phase_layout.n_grains)
        self.blobs = AnomalyBlobs(self.shape, len(ANOMALIES) - 1, self.seed) if self.anomaly else None
        step = self.energy[1] - self.energy[0]
        offsets = np.arange(0.0, PLASMON_EV + 4 * PLASMON_FWHM, step)
        plasmon = _gauss(offsets, PLASMON_EV, PLASMON_FWHM / 2.355)
        self._plasmon = (plasmon / plasmon.sum()).astype(np.float32)
        self._phase_table = np.array([[p[k] for k in PHASE_KEYS] for p in PHASES.values()])
        self._scale = self.dose / self._reference_edge_counts()
        self.count_dtype = count_dtype_for(4.0 * self.dose * self._peak_to_edge())

    # --- the spectral model -----------------------------------------------------------------
    def _spectra(self, params: np.ndarray, t: np.ndarray, shift: np.ndarray,
                 extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Expected spectra (unscaled) for per-pixel phase parameters, thickness and Fe shift."""
        # float32 throughout: the block is large and the model needs no more precision
        e = self.energy.astype(np.float32)[None, :]
        params = params.astype(np.float32)
        col = {k: params[:, i, None] for i, k in enumerate(PHASE_KEYS)}
        t = t.astype(np.float32)[:, None]
        shift = shift.astype(np.float32)[:, None]
        width = col["width"] * (1.0 + 0.35 * t)  # plural scattering broadens the lines
        l3 = col["l3"] + shift
        fe = (_lorentz(e, l3, width) + col["shoulder_w"] * _lorentz(e, l3 + col["shoulder"], width)
              + (_lorentz(e, l3 + 12.9, 1.3 * width)
                 + col["shoulder_w"] * _lorentz(e, l3 + 12.9 + col["shoulder"], 1.3 * width)) / col["ratio"])
        fe = 3.0 * fe + 0.9 * _step(e, l3 - 0.5, 1.0) + 0.45 * _step(e, l3 + 12.4, 1.0)
        o_on = 532.0 + 0.3 * shift
        ok = (0.9 * _step(e, o_on, 0.8) + col["o_pre"] * _gauss(e, o_on - 1.5, 0.7 * width)
              + 0.55 * _gauss(e, o_on + 9.0, 2.2 * width) + 0.35 * _gauss(e, o_on + 27.0, 4.0))
        edges = 2.0 * col["fe"] * fe + 2.2 * col["o"] * ok
        if extra is not None:
            edges = edges + extra.get("edges", 0.0)
        # plural scattering: a plasmon replica of the edges with weight ~ t (non-linear in t)
        # Plural scattering: the edges convolved with the (broad) plasmon loss, weight ~ t.
        replica = fftconvolve(edges, self._plasmon[None, :], mode="full", axes=1)[:, : edges.shape[1]]
        edges = edges + 0.45 * t * replica.astype(np.float32)
        slope = 3.4 - 0.8 * t  # thicker regions: flatter background
        background = 1.6 * (e / 530.0) ** (-slope)
        if extra is not None and "background" in extra:
            background = background * extra["background"]
        return (t * np.exp(-t)) * (background + edges)

    def _reference_edge_counts(self) -> float:
        """Mean unscaled intensity just above the Fe-L3 edge for Fe2O3 at mean thickness."""
        ref = self._spectra(self._phase_table[:1], np.array([0.8]), np.array([0.0]))[0]
        window = (self.energy > 712.0) & (self.energy < 718.0)
        return float(ref[window].mean())

    def _peak_to_edge(self) -> float:
        spectra = self._spectra(self._phase_table, np.full(len(PHASES), 0.3), np.zeros(len(PHASES)))
        return float(spectra.max() / self._reference_edge_counts()) * 2.0

    # --- the Generator protocol -------------------------------------------------------------
    def _pixels(self, y0: int, y1: int, x0: int, x1: int):
        return self._at(*block_coords(y0, y1, x0, x1))

    def _at(self, y: np.ndarray, x: np.ndarray):
        weights, grain, _g2, _mix = self.phase_layout.evaluate(y, x)
        t = 0.8 + 0.45 * self.thickness(y, x)  # t/lambda in 0.35 .. 1.25
        shift = 0.35 * self.shift(y, x) + self.grain_shift[grain]
        kind = self.blobs.kind_at(y, x) if self.blobs is not None else np.zeros(len(y), np.int8)
        return weights, t, shift, kind

    def clean_block(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.clean_at(*block_coords(y0, y1, x0, x1)).reshape(y1 - y0, x1 - x0, self.channels)

    def clean_at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Expected counts at scan positions ``y``, ``x`` (flat), float32 ``(n, channels)``."""
        weights, t, shift, kind = self._at(y, x)
        out = np.empty((len(t), self.channels), dtype=np.float32)
        # in slabs of pixels: the model's temporaries stay a few MB whatever the block size
        for i in range(0, len(t), SLAB_PIXELS):
            s = slice(i, i + SLAB_PIXELS)
            out[s] = self._mixed_spectra(weights[s], t[s], shift[s], kind[s])
        return out

    def _mixed_spectra(self, weights, t, shift, kind) -> np.ndarray:
        # Mixed pixels are linear mixtures of spectra (the beam sees both grains), not of parameters.
        out = np.zeros((len(t), self.channels), dtype=np.float32)
        for p in range(len(PHASES)):
            sel = weights[:, p] > 0
            if sel.any():
                table = np.broadcast_to(self._phase_table[p], (int(sel.sum()), len(PHASE_KEYS)))
                out[sel] += weights[sel, p, None] * self._spectra(table, t[sel], shift[sel])
        if kind.any():
            out[kind > 0] = self._anomalous(kind[kind > 0], weights[kind > 0], t[kind > 0], shift[kind > 0])
        out *= self._scale
        return out

    def _anomalous(self, kind, weights, t, shift) -> np.ndarray:
        e = self.energy.astype(np.float32)[None, :]
        table = np.einsum("np,pk->nk", weights, self._phase_table)
        out = np.zeros((len(kind), self.channels), dtype=np.float32)
        contam = kind == 1
        if contam.any():
            # A fluorine-bearing hydrocarbon film: thicker, flatter background, F-K edge, Fe covered.
            tab = table[contam].copy()
            tab[:, PHASE_KEYS.index("fe")] *= 0.6
            f_edge = 0.9 * (_step(e, 685.0, 1.0) + 1.2 * _gauss(e, 692.0, 2.5))
            extra = {"edges": np.broadcast_to(f_edge, (int(contam.sum()), self.channels)),
                     "background": 1.0 + 0.9 * (e / 530.0) ** 1.2}
            out[contam] = self._spectra(tab, t[contam], shift[contam], extra)
        damage = kind == 2
        if damage.any():
            # Beam damage: Fe reduced (FeO-like white lines), half the oxygen gone, O2 in bubbles.
            tab = np.broadcast_to(self._phase_table[self.phase_names.index("FeO")],
                                  (int(damage.sum()), len(PHASE_KEYS))).copy()
            tab[:, PHASE_KEYS.index("o")] *= 0.5
            tab[:, PHASE_KEYS.index("ratio")] = 3.2
            o2 = 2.5 * _gauss(e, 530.8, 0.35)
            extra = {"edges": np.broadcast_to(o2, (int(damage.sum()), self.channels))}
            out[damage] = self._spectra(tab, t[damage], shift[damage] - 0.6, extra)
        return out

    def truth_block(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        weights, _t, _shift, kind = self._pixels(y0, y1, x0, x1)
        label = weights.argmax(axis=1).astype(np.int16)
        label[kind > 0] = -1
        shape = (y1 - y0, x1 - x0)
        return label.reshape(shape), kind.reshape(shape)

    def purity_block(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The majority phase's weight per pixel (1: a pure pixel; about 0.5 on a boundary)."""
        weights = self._pixels(y0, y1, x0, x1)[0]
        return weights.max(axis=1).reshape(y1 - y0, x1 - x0)

    def attrs(self) -> dict[str, Any]:
        params = self.parameters()
        attrs = {
            "kind": "spectrum",
            "synthetic": True,
            "source": {"path": None, "generator": "emscale synth eels"},
            "generator": {"name": "eels", **params},
            "phase_names": self.phase_names,
        }
        if self.anomaly:
            attrs["anomaly_names"] = list(ANOMALIES)
        return attrs


PHASE_KEYS = ("fe", "o", "l3", "shoulder", "shoulder_w", "ratio", "width", "o_pre")


def synth_eels(shape=(64, 64), channels: int = 1024, anomaly: bool = False, seed: int = 0,
               dose: float = 50.0, read_noise: float = 1.0, policy: ChunkPolicy | None = None,
               store_clean: bool = False, **kwargs) -> xr.Dataset:
    """A lazy synthetic EELS spectrum image; write it with ``emscale.store.write_scan``
    (``store_clean``: keep the clean signal in the store, else it is regenerated when read)."""
    gen = EELSGenerator(shape=tuple(shape), channels=channels, anomaly=anomaly, seed=seed, dose=dose,
                        read_noise=read_noise, **kwargs)
    return lazy_scan(gen, policy, store_clean)
