"""Synthetic 4D-STEM scans: nano-beam diffraction of a polycrystalline wedge at a specimen edge.

The scan shows vacuum (a wavy band along the top edge: the specimen edge), an amorphous phase and
two crystalline phases (a cubic-like square lattice and a hexagonal lattice), as Voronoi grains with
mixed pixels across boundaries. Every grain has its own in-plane orientation and a small
out-of-plane tilt, so patterns of one phase differ from grain to grain as they do in real data.

Physics, kept simple but not a toy:

- every pattern is a convex combination of a few normalised *basis images* (each sums to 1 over
  the detector), times the dose: the unscattered central disk, one Bragg-disk image per grain, an
  amorphous ring, a diffuse inelastic/thermal halo and, for anomalies, a damage halo and a
  low-angle contamination background;
- Bragg disks sit at the reciprocal-lattice points of the rotated lattice, have the central disk's
  radius (the probe convergence angle), and have kinematic intensities ``|F_g|^2`` times a
  Debye-Waller factor ``exp(-B g^2)`` times a Lorentzian in the excitation error (Ewald-sphere
  curvature plus the grain's tilt);
- the local thickness (a smooth wedge) sets how much leaves the central disk: a two-beam-like
  ``sin^2(pi t / 2 xi)`` fraction into the Bragg disks (each phase its own extinction distance
  ``xi``), a saturating fraction into the amorphous ring, a linear fraction into the halo and a
  small loss to angles beyond the detector;
- disk edges are a 1-pixel linear ramp (anti-aliased), so intensities vary smoothly with position.

Per-grain Bragg images are built on demand in the worker and kept in a bounded LRU cache; a block is
then one float32 matrix product ``(pixels, bases) @ (bases, ky*kx)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import xarray as xr

from emscale.errors import ConfigError
from emscale.store import ChunkPolicy
from emscale.synth import count_dtype_for, lazy_scan, poisson_gaussian_counts
from emscale.synth.layout import (
    AnomalyBlobs,
    GrainLayout,
    SmoothField,
    block_coords,
    block_rng,
)

PHASE_NAMES = ["vacuum", "amorphous", "cubic", "hexagonal"]
VACUUM, AMORPHOUS = 0, 1
ANOMALY_NAMES = ["none", "beam damage", "contamination"]
DAMAGE, CONTAMINATION = 1, 2

PATTERN_MIN, PATTERN_MAX = 64, 256
K_HALF_RANGE = 6.4  # 1/nm from the pattern centre to the detector edge (along its shorter side)
DISK_FRACTION = 0.04  # probe disk radius as a fraction of the shorter pattern side
WAVELENGTH_NM = 0.002508  # 200 keV electrons
BEAM_ENERGY_KEV = 200.0
SCAN_STEP_NM = 0.5
THICKNESS_NM = (20.0, 100.0)  # range of the wedge; vacuum pixels have none

# Crystalline phases: real-space lattice vectors (nm, rows), basis atoms (fractional positions and
# scattering weights), Debye-Waller B (nm^2) and extinction distance xi (nm).
CRYSTALS: dict[int, dict[str, Any]] = {
    2: {  # cubic-like: a CsCl-type [001] projection, strong/weak alternating reflections
        "lattice": ((0.36, 0.0), (0.0, 0.36)),
        "basis": (((0.0, 0.0), 1.0), ((0.5, 0.5), 0.5)),
        "debye_waller": 0.07,
        "extinction": 110.0,
        "max_bragg": 0.8,
    },
    3: {  # hexagonal: a honeycomb (hBN-like) [0001] projection, larger cell
        "lattice": ((0.50, 0.0), (-0.25, 0.50 * math.sqrt(3) / 2)),
        "basis": (((0.0, 0.0), 1.0), ((1 / 3, 2 / 3), 0.6)),
        "debye_waller": 0.09,
        "extinction": 130.0,
        "max_bragg": 0.7,
    },
}
EXCITATION_WIDTH = 0.03  # 1/nm: half width of the rocking curve (relrod length ~ 1/thickness)
TILT_RAD = 0.004  # spread of the grains' out-of-plane tilt
# Amorphous phase: two diffuse rings (radius 1/nm, width 1/nm, weight); scattering length (nm).
AMORPHOUS_RINGS = ((3.3, 0.45, 1.0), (5.8, 0.7, 0.35))
AMORPHOUS_LENGTH = 60.0
AMORPHOUS_MAX = 0.55
HALO_DECAY = 1.6  # 1/nm: exponential fall-off of the inelastic/thermal diffuse halo
HALO_PER_NM = 0.0012  # fraction of the beam into the halo per nm of thickness
LOSS_PER_NM = 0.0012  # fraction scattered beyond the detector per nm of thickness
# Anomalies: beam damage amorphises (Bragg fades into a broad halo); contamination adds a layer
# that scatters strongly to low angles.
DAMAGE_BRAGG_LEFT = 0.15
DAMAGE_HALO = 0.25
DAMAGE_RING = (2.6, 1.3)  # radius, width (1/nm)
CONTAMINATION_FRACTION = 0.35
CONTAMINATION_WIDTH = 0.9  # 1/nm, Gaussian sigma

# Fixed basis images (columns of the per-block matrix), then one column per crystalline grain.
B_DISK, B_HALO, B_RING, B_DAMAGE, B_CONTAM = range(5)
N_FIXED = 5
GRAIN_CACHE = 256  # per-grain Bragg images kept per process (64 MiB at 256x256 patterns)


# --- basis images (cached per process; read-only arrays) --------------------------------------


def _k_grid(pattern: tuple[int, int], cal: float) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal-space coordinates (1/nm) of the detector pixels, 0 at pixel ``n // 2``."""
    ky = (np.arange(pattern[0]) - pattern[0] // 2) * cal
    kx = (np.arange(pattern[1]) - pattern[1] // 2) * cal
    return ky[:, None], kx[None, :]


def _normalised(img: np.ndarray) -> np.ndarray:
    out = (img / img.sum()).astype(np.float32).ravel()
    out.flags.writeable = False  # shared between blocks and threads
    return out


def _soft_disk(dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """A disk with a 1-pixel linear edge ramp (offsets and radius in pixels)."""
    return np.clip(radius + 0.5 - np.hypot(dy, dx), 0.0, 1.0)


@lru_cache(maxsize=8)
def _fixed_bases(pattern: tuple[int, int], cal: float, radius: float) -> np.ndarray:
    """The grain-independent basis images, ``(N_FIXED, ky*kx)`` float32, each summing to 1."""
    ky, kx = _k_grid(pattern, cal)
    k = np.hypot(ky, kx)
    disk = _soft_disk(ky / cal, kx / cal, radius)
    halo = np.exp(-k / HALO_DECAY)
    ring = sum(w * np.exp(-0.5 * ((k - r) / s) ** 2) for r, s, w in AMORPHOUS_RINGS)
    damage = np.exp(-0.5 * ((k - DAMAGE_RING[0]) / DAMAGE_RING[1]) ** 2) + 0.3 * halo
    contam = np.exp(-0.5 * (k / CONTAMINATION_WIDTH) ** 2)
    bases = np.stack([_normalised(b) for b in (disk, halo, ring, damage, contam)])
    bases.flags.writeable = False
    return bases


@lru_cache(maxsize=2)
def _reflections(phase: int) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal-lattice vectors ``g`` (n, 2) in (y, x), 1/nm, and their ``|F_g|^2``."""
    spec = CRYSTALS[phase]
    a = np.array(spec["lattice"])  # rows: a1, a2 as (x, y)
    b = np.linalg.inv(a).T  # rows: b1, b2 with a_i . b_j = delta_ij (crystallographic, no 2 pi)
    # Far enough for the detector corner of the most elongated allowed pattern (64 x 256).
    g_max = K_HALF_RANGE * math.hypot(1.0, PATTERN_MAX / PATTERN_MIN) + 1.0
    n = int(g_max / np.linalg.norm(b, axis=1).min()) + 1
    h, k = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    hl = np.column_stack([h.ravel(), k.ravel()])  # Miller indices
    hl = hl[np.any(hl != 0, axis=1)]
    g_xy = hl @ b
    keep = np.hypot(g_xy[:, 0], g_xy[:, 1]) <= g_max
    hl, g_xy = hl[keep], g_xy[keep]
    f = sum(w * np.exp(2j * np.pi * (hl @ np.asarray(pos))) for pos, w in spec["basis"])
    return g_xy[:, ::-1].copy(), np.abs(f) ** 2


@lru_cache(maxsize=GRAIN_CACHE)
def _bragg_image(pattern: tuple[int, int], cal: float, radius: float, phase: int,
                 angle: float, tilt_y: float, tilt_x: float) -> np.ndarray:
    """One grain's Bragg disks (central beam excluded), ``(ky*kx,)`` float32 summing to 1."""
    g, f2 = _reflections(phase)
    c, s = math.cos(angle), math.sin(angle)
    g = g @ np.array([[c, s], [-s, c]])  # in-plane rotation of the grain
    g2 = (g**2).sum(axis=1)
    # Excitation error: Ewald-sphere curvature plus the grain's small out-of-plane tilt.
    s_g = 0.5 * WAVELENGTH_NM * g2 + g @ np.array([tilt_y, tilt_x])
    debye_waller = np.exp(-CRYSTALS[phase]["debye_waller"] * g2)
    weight = f2 * debye_waller / (1.0 + (s_g / EXCITATION_WIDTH) ** 2)
    ny, nx = pattern
    img = np.zeros(pattern)
    centre = np.array([ny // 2, nx // 2]) + g / cal  # disk centres in pixels
    half = int(math.ceil(radius)) + 1
    seen = np.all((centre > -half) & (centre < np.array(pattern) + half), axis=1)
    for (cy, cx), w in zip(centre[seen], weight[seen]):
        y0, y1 = max(math.floor(cy) - half, 0), min(math.floor(cy) + half + 2, ny)
        x0, x1 = max(math.floor(cx) - half, 0), min(math.floor(cx) + half + 2, nx)
        yy = np.arange(y0, y1)[:, None] - cy
        xx = np.arange(x0, x1)[None, :] - cx
        img[y0:y1, x0:x1] += w * _soft_disk(yy, xx, radius)
    return _normalised(img)


# --- the generator ----------------------------------------------------------------------------


def _pair(value, name: str) -> tuple[int, int]:
    try:
        a, b = value
        if int(a) != a or int(b) != b:
            raise ValueError
        return int(a), int(b)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: must be two integers, got {value!r}") from None


@dataclass
class DiffractionGenerator:
    """Synthetic 4D-STEM generator (see the module docstring); implements ``synth.Generator``."""

    shape: tuple[int, int] = (64, 64)
    pattern: tuple[int, int] = (64, 64)
    anomaly: bool = False
    seed: int = 0
    dose: float = 20000.0
    read_noise: float = 0.0
    grain_size: float | None = None
    scan_step: float = SCAN_STEP_NM

    kind: ClassVar[str] = "diffraction"
    signal_shape: tuple[int, int] = field(init=False)
    count_dtype: Any = field(init=False)

    def __post_init__(self) -> None:
        self.shape = _pair(self.shape, "shape")
        if min(self.shape) < 1:
            raise ConfigError(f"shape: each scan dimension must be >= 1, got {self.shape}")
        self.pattern = _pair(self.pattern, "pattern")
        if not all(PATTERN_MIN <= n <= PATTERN_MAX for n in self.pattern):
            raise ConfigError(
                f"pattern: each detector dimension must be {PATTERN_MIN}..{PATTERN_MAX} pixels, "
                f"got {self.pattern}"
            )
        if not (math.isfinite(self.dose) and self.dose > 0):
            raise ConfigError(f"dose: must be a positive number of electrons, got {self.dose!r}")
        if not (math.isfinite(self.read_noise) and self.read_noise >= 0):
            raise ConfigError(f"read_noise: must be >= 0, got {self.read_noise!r}")
        if not (math.isfinite(self.scan_step) and self.scan_step > 0):
            raise ConfigError(f"scan_step: must be positive (nm), got {self.scan_step!r}")
        self.seed, self.anomaly = int(self.seed), bool(self.anomaly)
        self.dose, self.read_noise = float(self.dose), float(self.read_noise)
        self.signal_shape = self.pattern
        # Fixed reciprocal-space range and probe angle: a bigger detector samples more finely.
        side = min(self.pattern)
        self.calibration = 2 * K_HALF_RANGE / side
        self.disk_radius = DISK_FRACTION * side

        ny, nx = self.shape
        self.layout = GrainLayout(self.shape, len(PHASE_NAMES), self.seed,
                                  grain_size=self.grain_size, surface_phase=VACUUM,
                                  surface_depth=0.15)
        self.grain_size = float(self.layout.grain_size)
        self._thickness = SmoothField(self.shape, self.seed + 11,
                                      wavelength=max(16.0, 0.6 * max(ny, nx)))
        self.blobs = AnomalyBlobs(self.shape, 2, self.seed) if self.anomaly else None
        # The brightest pixel is the vacuum central disk; every other pattern is spread wider.
        disk = _fixed_bases(self.pattern, self.calibration, self.disk_radius)[B_DISK]
        peak = self.dose * float(disk.max())
        self.count_dtype = count_dtype_for(peak + 5 * self.read_noise)

    # -- spatial fields ---------------------------------------------------------------------

    def thickness(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Specimen thickness (nm): a wedge growing away from the top edge, smoothly modulated."""
        ny = self.shape[0]
        rel = 0.5 + 0.3 * self._thickness(y, x) + 0.3 * (y / max(ny - 1, 1) - 0.5)
        lo, hi = THICKNESS_NM
        return lo + (hi - lo) * np.clip(rel, 0.0, 1.0)

    def _anomaly_kind(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        if self.blobs is None:
            return np.zeros(len(y), dtype=np.int8)
        return self.blobs.kind_at(y, x)

    def _grain_tilt(self, grain: int) -> tuple[float, float]:
        ty, tx = np.random.default_rng([self.seed, 303, grain]).normal(0.0, TILT_RAD, 2)
        return float(ty), float(tx)

    # -- Generator protocol -----------------------------------------------------------------

    def purity_block(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The dominant phase's weight per pixel (1: a pure pixel; about 0.5 on a boundary)."""
        w, *_ = self.layout.evaluate(*block_coords(y0, y1, x0, x1))
        return w.max(axis=1).reshape(y1 - y0, x1 - x0)

    def truth_block(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        y, x = block_coords(y0, y1, x0, x1)
        w, *_ = self.layout.evaluate(y, x)
        label = np.argmax(w, axis=1).astype(np.int16)  # the dominant phase of a mixed pixel
        kind = self._anomaly_kind(y, x)
        label[kind > 0] = -1
        shape = (y1 - y0, x1 - x0)
        return label.reshape(shape), kind.reshape(shape)

    def clean_block(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Expected counts, float32 ``(rows, cols, ky, kx)``: coefficients @ basis images."""
        return self.clean_at(*block_coords(y0, y1, x0, x1)).reshape(y1 - y0, x1 - x0, *self.pattern)

    def clean_at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Expected counts at scan positions ``y``, ``x`` (flat), float32 ``(n, ky, kx)``."""
        n = len(y)
        w, g1, g2, mix = self.layout.evaluate(y, x)
        t = self.thickness(y, x)
        vacuum = w[:, VACUUM]  # the surface band covers the grains: its weight is the cover
        phase = self.layout.grain_phase

        crystal_grains = np.unique(np.concatenate([g1, g2]))
        crystal_grains = crystal_grains[phase[crystal_grains] >= 2]
        coef = np.zeros((n, N_FIXED + len(crystal_grains)))
        coef[:, B_DISK] = vacuum
        halo = HALO_PER_NM * t
        kept = 1.0 - LOSS_PER_NM * t  # the rest scatters beyond the detector
        for grain, share in ((g1, (1.0 - mix) * (1.0 - vacuum)), (g2, mix * (1.0 - vacuum))):
            p = phase[grain]
            share = share * kept
            amorph = p == AMORPHOUS
            scattered = np.where(amorph, AMORPHOUS_MAX * (1.0 - np.exp(-t / AMORPHOUS_LENGTH)), 0.0)
            coef[:, B_RING] += share * scattered
            for cp, spec in CRYSTALS.items():
                sel = np.flatnonzero(p == cp)
                # Two-beam-like pendellosung, t < xi so that thicker means more Bragg intensity.
                phase_angle = 0.5 * np.pi * t[sel] / spec["extinction"]
                scattered[sel] = spec["max_bragg"] * np.sin(phase_angle) ** 2
                cols = N_FIXED + np.searchsorted(crystal_grains, grain[sel])
                coef[sel, cols] += share[sel] * scattered[sel]  # one entry per row: no repeats
            coef[:, B_DISK] += share * (1.0 - scattered - halo)
            coef[:, B_HALO] += share * halo

        kind = self._anomaly_kind(y, x)
        dmg = kind == DAMAGE
        if dmg.any():  # Bragg disks fade, the lost intensity and some more become a broad halo
            bragg = coef[dmg, N_FIXED:]
            lost = (1.0 - DAMAGE_BRAGG_LEFT) * bragg.sum(axis=1)
            coef[dmg, N_FIXED:] = DAMAGE_BRAGG_LEFT * bragg
            extra = DAMAGE_HALO * coef[dmg, B_DISK] * (1.0 - vacuum[dmg])  # specimen only
            coef[dmg, B_DISK] -= extra
            coef[dmg, B_DAMAGE] += lost + extra
        con = kind == CONTAMINATION
        if con.any():  # a contamination layer scatters part of everything to low angles
            coef[con] *= 1.0 - CONTAMINATION_FRACTION
            coef[con, B_CONTAM] += CONTAMINATION_FRACTION

        bases = [_fixed_bases(self.pattern, self.calibration, self.disk_radius)]
        for g in crystal_grains:
            angle = float(self.layout.grain_orientation[g])
            image = _bragg_image(self.pattern, self.calibration, self.disk_radius, int(phase[g]),
                                 angle, *self._grain_tilt(int(g)))
            bases.append(image[None])
        basis = np.concatenate(bases) if len(bases) > 1 else bases[0]
        coef = (np.clip(coef, 0.0, None) * self.dose).astype(np.float32)
        out = coef @ basis  # float32 GEMM: one pass over the block's memory
        return out.reshape(n, *self.pattern)

    def noisy_block(self, clean: np.ndarray, y0: int, x0: int) -> np.ndarray:
        rng = block_rng(self.seed, y0, x0)
        return poisson_gaussian_counts(clean, rng, self.read_noise, self.count_dtype)

    def coords(self) -> dict[str, Any]:
        ny, nx = self.shape
        ky, kx = _k_grid(self.pattern, self.calibration)
        k_attrs = {"units": "1/nm", "long_name": "scattering vector"}
        return {
            "y": ("y", np.arange(ny) * self.scan_step, {"units": "nm"}),
            "x": ("x", np.arange(nx) * self.scan_step, {"units": "nm"}),
            "ky": ("ky", ky.ravel(), dict(k_attrs)),
            "kx": ("kx", kx.ravel(), dict(k_attrs)),
        }

    def attrs(self) -> dict[str, Any]:
        probe_k = self.disk_radius * self.calibration  # disk radius in 1/nm
        attrs: dict[str, Any] = {
            "kind": self.kind,
            "synthetic": True,
            "generator": {
                "name": "diffraction",
                "shape": list(self.shape),
                "pattern": list(self.pattern),
                "anomaly": self.anomaly,
                "seed": self.seed,
                "dose": self.dose,
                "read_noise": self.read_noise,
                "grain_size": self.grain_size,
                "scan_step": float(self.scan_step),
            },
            "calibration": {
                "k_per_pixel": float(self.calibration),
                "k_units": "1/nm",
                "scan_step": float(self.scan_step),
                "scan_units": "nm",
                "beam_energy_kev": BEAM_ENERGY_KEV,
                "probe_semi_angle_mrad": round(probe_k * WAVELENGTH_NM * 1e3, 3),
            },
            "phase_names": list(PHASE_NAMES),
            "source": {"path": None, "generator": "emscale synth 4dstem"},
        }
        if self.anomaly:
            attrs["anomaly_names"] = list(ANOMALY_NAMES)
        return attrs


def synth_diffraction(
    shape: tuple[int, int] = (64, 64),
    pattern: tuple[int, int] = (64, 64),
    anomaly: bool = False,
    seed: int = 0,
    dose: float = 20000.0,
    read_noise: float = 0.0,
    policy: ChunkPolicy | None = None,
    store_clean: bool = False,
) -> xr.Dataset:
    """A lazy synthetic 4D-STEM scan (``signal``, ``clean``, ``label``, ``anomaly_kind``;
    ``store_clean``: keep the clean signal in the store, else it is regenerated when read)."""
    gen = DiffractionGenerator(shape=shape, pattern=pattern, anomaly=anomaly, seed=seed, dose=dose,
                               read_noise=read_noise)
    return lazy_scan(gen, policy, store_clean)
