"""The lecture's synthetic EELS spectra, as it describes them (``shared/reference``, week 8):
spectra near the Fe-L2,3 edge, 700-740 eV, each two Gaussian peaks (L3 near 707 eV, L2 near
720 eV), four groups of equal size with distinct peak positions and relative intensities (Fe2O3,
FeO, Fe3O4 and an amorphous surface phase, D), about 50 electrons per channel, Poisson plus
Gaussian noise.

What the lecture does not state is chosen here and said: a flat baseline under the peaks (0.5 of
the L3 height: the value at which the noisy input's error is the lecture's, 0.0045 against its
0.00449, on its scale), per-spectrum jitter of the peak positions
(0.15 eV) and heights (4 %) so that a group is a cloud and not one point, and 1 count of Gaussian
read noise. The layout is ``BandLayout``: one band of pure pixels per group, top to bottom, so a
scan of 20 x 20 pixels holds the lecture's 4 x 100 spectra. Same generator protocol as
``emscale.synth.eels.EELSGenerator`` (``emscale bench quality --data lecture``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emscale.errors import ConfigError
from emscale.synth import SpectrumImage, count_dtype_for
from emscale.synth.layout import BandLayout, block_coords

# Per group: L3 and L2 peak positions (eV), L2/L3 height ratio, Gaussian sigma (eV).
GROUPS: dict[str, tuple[float, float, float, float]] = {
    "Fe2O3": (709.5, 722.6, 0.35, 1.2),
    "FeO": (707.6, 720.6, 0.55, 1.4),
    "Fe3O4": (708.6, 721.6, 0.45, 1.3),
    "surface": (709.0, 722.4, 0.75, 2.2),  # amorphous: broader lines (phase D)
}
BASELINE = 0.5
JITTER_EV = 0.15
JITTER_HEIGHT = 0.04


@dataclass
class LectureGenerator(SpectrumImage):
    shape: tuple[int, int] = (20, 20)
    channels: int = 200
    energy_range: tuple[float, float] = (700.0, 740.0)
    electrons_per_channel: float = 50.0
    read_noise: float = 1.0
    seed: int = 42
    kind: str = field(default="spectrum", init=False)

    def __post_init__(self) -> None:
        self.shape = tuple(int(n) for n in self.shape)
        if len(self.shape) != 2 or self.shape[0] < len(GROUPS) or self.shape[1] < 1:
            raise ConfigError(f"shape: need {len(GROUPS)} rows at least (one band per group), "
                              f"got {self.shape}")
        if self.channels < 16:
            raise ConfigError(f"channels: at least 16 are needed, got {self.channels}")
        if not self.electrons_per_channel > 0:
            raise ConfigError(f"electrons_per_channel: must be positive, got "
                              f"{self.electrons_per_channel}")
        self.signal_shape = (self.channels,)
        self.energy = np.linspace(*self.energy_range, self.channels)
        self.phase_names = list(GROUPS)
        self.phase_layout = BandLayout(self.shape, len(GROUPS))
        self._table = np.array(list(GROUPS.values()), np.float64)
        self.count_dtype = count_dtype_for(20 * self.electrons_per_channel)

    def _shapes(self, group: np.ndarray, jitter: np.ndarray) -> np.ndarray:
        """Unscaled spectra: baseline + L3 + L2 Gaussians of each pixel's group, jittered."""
        l3, l2, ratio, sigma = (self._table[group, i, None] for i in range(4))
        shift = JITTER_EV * jitter[:, :1]
        height = 1 + JITTER_HEIGHT * jitter[:, 1:2]
        e = self.energy[None, :]
        peaks = (np.exp(-0.5 * ((e - l3 - shift) / sigma) ** 2)
                 + ratio * height * np.exp(-0.5 * ((e - l2 - shift) / sigma) ** 2))
        return BASELINE + peaks

    def clean_at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        group = self.phase_layout.band(y)
        # each pixel's own jitter: from the seed and its position (any chunking gives the same)
        index = (y.astype(np.int64) * self.shape[1] + x.astype(np.int64))
        jitter = np.stack([np.random.default_rng([self.seed, 77, int(i)]).standard_normal(2)
                           for i in index]) if len(index) else np.zeros((0, 2))
        spectra = self._shapes(group, jitter)
        # electrons per channel: the mean over the channels of the group's mean spectrum
        mean = self._shapes(np.arange(len(GROUPS)), np.zeros((len(GROUPS), 2))).mean()
        return (spectra * (self.electrons_per_channel / mean)).astype(np.float32)

    def clean_block(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.clean_at(*block_coords(y0, y1, x0, x1)).reshape(y1 - y0, x1 - x0,
                                                                     self.channels)

    def truth_block(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        y, _ = block_coords(y0, y1, x0, x1)
        shape = (y1 - y0, x1 - x0)
        return (self.phase_layout.band(y).astype(np.int16).reshape(shape),
                np.zeros(shape, np.int8))

    def purity_block(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.ones((y1 - y0, x1 - x0))

    def attrs(self) -> dict[str, Any]:
        return {"kind": "spectrum", "synthetic": True,
                "source": {"path": None, "generator": "the lecture's spectra"},
                "generator": {"name": "lecture", **self.parameters()},
                "phase_names": self.phase_names}


def synth_lecture(shape=(20, 20), channels: int = 200, seed: int = 42, policy=None,
                  store_clean: bool = False, **kwargs):
    """A lazy scan of the lecture's spectra (``emscale.store.write_scan`` writes it)."""
    from emscale.synth import lazy_scan

    return lazy_scan(LectureGenerator(shape=tuple(shape), channels=channels, seed=seed, **kwargs),
                     policy, store_clean)
