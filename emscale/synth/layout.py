"""Spatial layouts shared by the synthetic generators: grains, smooth fields, anomalous blobs.

Everything here is defined analytically from a seed and a handful of parameters, so that any
navigation block can be evaluated on its own, in any process, without the rest of the scan: the
generators stay chunk-by-chunk whatever the scan size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

MAX_GRAINS = 4000


def block_coords(y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (float) of a navigation block, flattened row-major."""
    yy, xx = np.meshgrid(np.arange(y0, y1, dtype=np.float64), np.arange(x0, x1, dtype=np.float64),
                         indexing="ij")
    return yy.ravel(), xx.ravel()


@dataclass
class SmoothField:
    """A smooth random field in [-1, 1]: a sum of a few random plane waves.

    ``wavelength`` (pixels) sets the spatial scale; every pixel is evaluated independently.
    """

    shape: tuple[int, int]
    seed: int
    wavelength: float
    n_waves: int = 6

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        angle = rng.uniform(0, np.pi, self.n_waves)
        k = 2 * np.pi / (self.wavelength * rng.uniform(0.6, 1.6, self.n_waves))
        self._ky, self._kx = k * np.sin(angle), k * np.cos(angle)
        self._phase = rng.uniform(0, 2 * np.pi, self.n_waves)

    def __call__(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        waves = np.cos(np.outer(y, self._ky) + np.outer(x, self._kx) + self._phase)
        return (waves.sum(axis=1) / np.sqrt(self.n_waves / 2) / 2.2).clip(-1, 1)


@dataclass
class GrainLayout:
    """Voronoi grains, each of one phase, with mixed pixels across grain boundaries.

    ``grain_size`` is the typical grain diameter in pixels; ``boundary`` the width (pixels) of the
    mixed zone. ``phase_probability`` draws each grain's phase; every phase gets at least one
    grain. ``surface_phase`` (optional) is a wavy band along the top edge of the scan
    (``surface_depth`` of its height) that covers the grains there: an amorphous surface layer.
    """

    shape: tuple[int, int]
    n_phases: int
    seed: int
    grain_size: float | None = None
    boundary: float = 2.0
    phase_probability: tuple[float, ...] | None = None
    surface_phase: int | None = None
    surface_depth: float = 0.12
    _centres: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ny, nx = self.shape
        rng = np.random.default_rng([self.seed, 101])
        if self.grain_size is None:
            self.grain_size = float(np.clip(min(ny, nx) / 4.0, 6.0, 64.0))
        n = int(np.clip(ny * nx / self.grain_size**2, 4, MAX_GRAINS))
        self._centres = np.column_stack([rng.uniform(0, ny, n), rng.uniform(0, nx, n)])
        self._tree = cKDTree(self._centres)
        grain_phases = [p for p in range(self.n_phases) if p != self.surface_phase]
        prob = self.phase_probability
        if prob is not None:
            prob = np.asarray([prob[p] for p in grain_phases], dtype=float)
            prob = prob / prob.sum()
        phases = rng.choice(grain_phases, size=n, p=prob)
        phases[: len(grain_phases)] = rng.permutation(grain_phases)[: min(n, len(grain_phases))]
        self.grain_phase = phases
        self.grain_orientation = rng.uniform(0, 2 * np.pi, n)
        self._surface = SmoothField(self.shape, self.seed + 7, wavelength=max(nx, 8) / 2.0, n_waves=3)

    @property
    def n_grains(self) -> int:
        return len(self._centres)

    def evaluate(self, y: np.ndarray, x: np.ndarray):
        """Per pixel: ``(weights (n, n_phases), grain (n,), second_grain (n,), mix (n,))``.

        ``mix`` is the fraction of the second-nearest grain (0.5 exactly on a boundary).
        """
        dist, idx = self._tree.query(np.column_stack([y, x]), k=2)
        d1, d2 = dist[:, 0], dist[:, 1]
        mix = 0.5 * np.clip(1.0 - (d2 - d1) / (2.0 * self.boundary), 0.0, 1.0)
        g1, g2 = idx[:, 0], idx[:, 1]
        w = np.zeros((len(y), self.n_phases))
        rows = np.arange(len(y))
        np.add.at(w, (rows, self.grain_phase[g1]), 1.0 - mix)
        np.add.at(w, (rows, self.grain_phase[g2]), mix)
        if self.surface_phase is not None:
            ny = self.shape[0]
            edge = self.surface_depth * ny * (1.0 + 0.35 * self._surface(np.zeros_like(x), x))
            cover = np.clip(0.5 + (edge - y) / (2.0 * self.boundary), 0.0, 1.0)
            w *= (1.0 - cover)[:, None]
            w[:, self.surface_phase] += cover
        return w, g1, g2, mix


@dataclass
class BandLayout:
    """Equal horizontal bands of pure pixels, one phase each, top to bottom: groups of spectra
    of known phase and equal size (the lecture's experiment: 4 phases x 100 spectra), no mixing.
    Same interface as ``GrainLayout``; each band counts as one grain."""

    shape: tuple[int, int]
    n_phases: int

    @property
    def n_grains(self) -> int:
        return self.n_phases

    def band(self, y: np.ndarray) -> np.ndarray:
        return np.minimum((y * self.n_phases // self.shape[0]).astype(np.int64), self.n_phases - 1)

    def evaluate(self, y: np.ndarray, x: np.ndarray):
        g = self.band(y)
        w = np.zeros((len(y), self.n_phases))
        w[np.arange(len(y)), g] = 1.0
        return w, g, g, np.zeros(len(y))


@dataclass
class AnomalyBlobs:
    """A few elliptical regions per anomaly kind; ``kind_at`` gives 0 (none) or the kind 1..n."""

    shape: tuple[int, int]
    n_kinds: int
    seed: int
    per_kind: int = 2
    radius_fraction: float = 0.06

    def __post_init__(self) -> None:
        ny, nx = self.shape
        rng = np.random.default_rng([self.seed, 202])
        n = self.n_kinds * self.per_kind
        r0 = max(1.5, self.radius_fraction * min(ny, nx))
        self.centres = np.column_stack([rng.uniform(0.15, 0.85, n) * ny, rng.uniform(0.15, 0.85, n) * nx])
        self.radii = np.column_stack([r0 * rng.uniform(0.7, 1.3, n), r0 * rng.uniform(0.7, 1.3, n)])
        self.angle = rng.uniform(0, np.pi, n)
        self.kind = np.repeat(np.arange(1, self.n_kinds + 1), self.per_kind)

    def kind_at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        out = np.zeros(len(y), dtype=np.int8)
        for (cy, cx), (ry, rx), a, k in zip(self.centres, self.radii, self.angle, self.kind):
            dy, dx = y - cy, x - cx
            u = dy * np.cos(a) + dx * np.sin(a)
            v = -dy * np.sin(a) + dx * np.cos(a)
            out[(u / ry) ** 2 + (v / rx) ** 2 <= 1.0] = k
        return out


def block_rng(seed: int, y0: int, x0: int, stream: int = 0) -> np.random.Generator:
    """The noise generator of one navigation block: reproducible for a seed, shape and chunking."""
    return np.random.default_rng([seed, stream, y0, x0])
