"""Synthetic scans with ground truth, generated navigation block by navigation block.

A generator is an object with ``signal_shape``, ``clean_block(y0, y1, x0, x1)`` (expected counts,
float32, shape ``(rows, cols, *signal_shape)``), ``truth_block(y0, y1, x0, x1)`` (``label`` int16 and
``anomaly_kind`` int8, shape ``(rows, cols)``) and ``noisy_block(clean, y0, x0)`` (integer counts).
``lazy_scan`` turns one into a dask-backed Dataset whose every chunk is computed on its own, so a
100 GB scan is written with the memory of a few chunks.

The clean signal is float32 and compresses poorly (about 3x the disk of the integer counts), so a
store keeps it only when asked (``store_clean``); otherwise ``open_scan`` regenerates it on demand
from the generator's parameters in the store's attrs (``GeneratedClean``: for exactly the pixels
read, so a training sample grid costs only its own pixels).
"""

from __future__ import annotations

from typing import Any, Protocol

import dask.array as da
import numpy as np
import xarray as xr

from emscale.store import NAV_DIMS, SIGNAL_DIMS, ChunkPolicy, navigation_chunks


class Generator(Protocol):
    kind: str
    shape: tuple[int, int]
    signal_shape: tuple[int, ...]
    count_dtype: Any

    def clean_block(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray: ...
    def truth_block(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]: ...
    def noisy_block(self, clean: np.ndarray, y0: int, x0: int) -> np.ndarray: ...
    def coords(self) -> dict[str, Any]: ...
    def attrs(self) -> dict[str, Any]: ...


def _nav_range(block_info) -> tuple[int, int, int, int]:
    (y0, y1), (x0, x1) = block_info[None]["array-location"][:2]
    return y0, y1, x0, x1


def _clean(gen, block_info=None):
    return gen.clean_block(*_nav_range(block_info))


def _noisy(clean, gen, block_info=None):
    y0, _y1, x0, _x1 = _nav_range(block_info)
    return gen.noisy_block(clean, y0, x0)


def _truth(gen, which, block_info=None):
    return gen.truth_block(*_nav_range(block_info))[which]


CLEAN_ON_DEMAND = "clean_on_demand"  # the attr of a store whose clean signal is regenerated


def lazy_scan(gen: Generator, policy: ChunkPolicy | None = None,
              store_clean: bool = False) -> xr.Dataset:
    """A lazy scan Dataset (``signal``, ``clean``, ``label``, ``anomaly_kind``) from a generator.
    Without ``store_clean``, ``clean`` is marked to be left out of the store (attr
    ``clean_on_demand``: ``write_scan`` drops it, ``open_scan`` regenerates it)."""
    ny, nx = gen.shape
    cy, cx = navigation_chunks(gen.shape, gen.signal_shape, policy)
    nav_chunks = (da.core.normalize_chunks(cy, (ny,))[0], da.core.normalize_chunks(cx, (nx,))[0])
    sig_chunks = tuple((n,) for n in gen.signal_shape)
    # ``token`` names the tasks on the dashboard; dask appends a hash of the generator's parameters
    clean = da.map_blocks(_clean, gen, chunks=nav_chunks + sig_chunks, dtype=np.float32,
                          token=f"synth-clean-{gen.kind}")
    signal = da.map_blocks(_noisy, clean, gen, dtype=gen.count_dtype, token=f"synth-signal-{gen.kind}")
    label = da.map_blocks(_truth, gen, 0, chunks=nav_chunks, dtype=np.int16, token="synth-label")
    anomaly = da.map_blocks(_truth, gen, 1, chunks=nav_chunks, dtype=np.int8, token="synth-anomaly")
    dims = NAV_DIMS + SIGNAL_DIMS[gen.kind]
    attrs = gen.attrs()
    if not store_clean:
        attrs[CLEAN_ON_DEMAND] = True
    return xr.Dataset(
        {
            "signal": (dims, signal, {"long_name": "counts", "units": "counts"}),
            "clean": (dims, clean, {"long_name": "expected counts (noise free)", "units": "counts"}),
            "label": (NAV_DIMS, label, {"long_name": "ground-truth phase id (-1: anomalous)"}),
            "anomaly_kind": (NAV_DIMS, anomaly, {"long_name": "ground-truth anomaly kind (0: none)"}),
        },
        coords=gen.coords(),
        attrs=attrs,
    )


def generator_from_attrs(attrs: dict) -> Generator:
    """The generator that made a synthetic scan, from its store's ``generator`` attrs."""
    params = dict(attrs["generator"])
    name = params.pop("name")
    if name == "eels":
        from emscale.synth.eels import EELSGenerator

        return EELSGenerator(**params)
    if name == "eds":
        from emscale.synth.eds import EDSGenerator

        return EDSGenerator(**params)
    if name == "lecture":
        from emscale.synth.lecture import LectureGenerator

        return LectureGenerator(**params)
    from emscale.synth.diffraction import DiffractionGenerator

    return DiffractionGenerator(**params)


class GeneratedClean:
    """The clean signal of a synthetic scan as a lazy array: indexing generates the selected
    pixels (a strided slice along y and x generates only those), nothing is stored."""

    def __init__(self, gen: Generator):
        self.gen = gen
        self.shape = (*gen.shape, *gen.signal_shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        nav = [np.arange(self.shape[i])[k] for i, k in enumerate(key[:2])]
        rows, cols = (np.atleast_1d(v) for v in nav)
        yy, xx = np.meshgrid(rows.astype(np.float64), cols.astype(np.float64), indexing="ij")
        out = self.gen.clean_at(yy.ravel(), xx.ravel())
        out = out.reshape(len(rows), len(cols), *self.gen.signal_shape)[(slice(None),) * 2 + key[2:]]
        # an integer index drops its axis, as numpy does
        return out[tuple(0 if np.ndim(v) == 0 else slice(None) for v in nav)]

    def __dask_tokenize__(self):
        from dask.base import tokenize

        return ("GeneratedClean", tokenize(self.gen.attrs()))


def with_generated_clean(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with its ``clean`` signal regenerated lazily when its store left it out
    (chunked like ``signal``)."""
    if "clean" in ds or not ds.attrs.get(CLEAN_ON_DEMAND) or "generator" not in ds.attrs:
        return ds
    gen = generator_from_attrs(ds.attrs)
    sig = ds["signal"]
    clean = da.from_array(GeneratedClean(gen), chunks=sig.chunks or sig.shape,
                          name=f"synth-clean-{gen.kind}-" + GeneratedClean(gen).__dask_tokenize__()[1])
    return ds.assign(clean=(sig.dims, clean, {"long_name": "expected counts (noise free), "
                                              "regenerated", "units": "counts"}))


def poisson_gaussian_counts(clean: np.ndarray, rng: np.random.Generator, read_noise: float,
                            dtype) -> np.ndarray:
    """Shot noise plus Gaussian read noise, rounded to integer counts and clipped at 0.

    Detectors that store unsigned counts clip the (rare) negative read-noise values at zero.
    Works through the block in slabs so that the int64/float temporaries stay small.
    """
    out = np.empty(clean.shape, dtype=dtype)
    top = float(np.iinfo(dtype).max)
    flat_in, flat_out = clean.reshape(len(clean), -1), out.reshape(len(out), -1)
    rows = max(1, (1 << 22) // max(1, flat_in.shape[1]))
    for i in range(0, len(flat_in), rows):
        counts = rng.poisson(flat_in[i:i + rows]).astype(np.float32)
        if read_noise > 0:
            counts += rng.normal(0.0, read_noise, size=counts.shape).astype(np.float32)
        flat_out[i:i + rows] = np.clip(np.rint(counts), 0, top)
    return out


class SpectrumImage:
    """What the synthetic spectrum-image generators (dataclasses with ``seed``, ``shape``,
    ``energy``, ``energy_range``, ``read_noise``, ``count_dtype``) share: the noisy counts of a
    block, the coordinates, and their parameters for the store's attrs."""

    def noisy_block(self, clean: np.ndarray, y0: int, x0: int) -> np.ndarray:
        from emscale.synth.layout import block_rng

        return poisson_gaussian_counts(clean, block_rng(self.seed, y0, x0), self.read_noise,
                                       self.count_dtype)

    def coords(self) -> dict[str, Any]:
        return {
            "energy": ("energy", self.energy, {"units": "eV", "long_name": "energy loss"}),
            "y": ("y", np.arange(self.shape[0]) * 1.0, {"units": "nm", "long_name": "scan y"}),
            "x": ("x", np.arange(self.shape[1]) * 1.0, {"units": "nm", "long_name": "scan x"}),
        }

    def parameters(self) -> dict[str, Any]:
        """The generator's parameters (JSON-able): what rebuilds it (``generator_from_attrs``)."""
        from dataclasses import asdict

        params = {k: v for k, v in asdict(self).items() if k != "kind"}
        params["shape"] = list(self.shape)
        params["energy_range"] = list(self.energy_range)
        return params


def checked_outline(shape, channels: int) -> tuple[int, int]:
    """A spectrum generator's navigation shape and channel count, checked (errors name the
    field)."""
    from emscale.errors import ConfigError

    shape = tuple(int(n) for n in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ConfigError(f"shape: need two positive sizes (NY NX), got {shape}")
    if channels < 64:
        raise ConfigError(f"channels: at least 64 channels are needed, got {channels}")
    return shape


def count_dtype_for(max_expected: float):
    """uint16 while the counts fit with a wide margin, else uint32."""
    return np.uint16 if max_expected < 40000 else np.uint32
