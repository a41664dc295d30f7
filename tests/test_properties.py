"""Property-based tests (hypothesis): the chunk policy, the store round trip and the
preprocessing chain, over shapes, dtypes, chunkings and NaN patterns that no one picked by hand.
Each property compares with an in-memory reference, or expects an error that names the field."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emscale.errors import ConfigError, InputError
from emscale.ingest import ingest
from emscale.stages.preprocess import Preprocessor
from emscale.store import MIB, ChunkPolicy, navigation_chunks, open_scan

# few examples, no deadline: each writes a small store; the suite's time budget is tight
QUICK = settings(max_examples=25, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@QUICK
@given(ny=st.integers(1, 2000), nx=st.integers(1, 2000), channels=st.integers(1, 70000),
       target=st.floats(0.001, 256, allow_nan=False))
def test_chunk_policy_blocks_tile_the_scan_within_the_limit(ny, nx, channels, target):
    policy = ChunkPolicy.of(target)
    rows, cols = navigation_chunks((ny, nx), (channels,), policy)
    assert 1 <= rows <= ny and 1 <= cols <= nx
    pixel = channels * 4
    # a block holds at most the larger of the limit and one pixel (a pixel is never split)
    assert rows * cols * pixel <= max(policy.max_mib * MIB, pixel)


@QUICK
@given(target=st.one_of(st.floats(max_value=0, allow_nan=False), st.just(float("nan")),
                        st.just(float("inf"))))
def test_chunk_policy_refuses_a_size_that_is_not_one(target):
    with pytest.raises(ConfigError, match="chunk_mib"):
        ChunkPolicy.of(target)


DTYPES = ["uint8", "uint16", "uint32", "int16", "int32", "int64", ">u2", "float32", "float64",
          ">f4"]


@QUICK
@given(data=st.data(), shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 40)),
       dtype=st.sampled_from(DTYPES), chunk_kib=st.integers(1, 8))
def test_ingest_round_trip_equals_the_array(tmp_path_factory, data, shape, dtype, chunk_kib):
    """Any shape, count dtype (wide and big-endian ones converted), chunking and NaN pattern:
    the store reads back the array it was given."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        values = data.draw(st.lists(st.one_of(st.floats(-1e6, 1e6, width=32), st.just(np.nan)),
                                    min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    else:
        info = np.iinfo(dt)
        lo, hi = max(int(info.min), -(2**31)), min(int(info.max), 2**31 - 1)
        values = data.draw(st.lists(st.integers(lo, hi), min_size=int(np.prod(shape)),
                                    max_size=int(np.prod(shape))))
    array = np.asarray(values, dtype=dt).reshape(shape)
    tmp = tmp_path_factory.mktemp("rt")
    np.save(tmp / "raw.npy", array)
    with dask.config.set(scheduler="synchronous"):
        ingest(tmp / "raw.npy", tmp / "s.zarr", policy=ChunkPolicy(target_mib=chunk_kib / 1024),
               allow_nonfinite=True)
    back = open_scan(tmp / "s.zarr")["signal"].values
    assert back.dtype.isnative and back.dtype.kind == dt.kind
    np.testing.assert_array_equal(back, array)  # NaN where NaN


@QUICK
@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(2, 30)))
def test_ingest_refuses_nonfinite_naming_the_chunk(tmp_path_factory, shape):
    array = np.ones(shape, np.float32)
    array[-1, -1, -1] = np.nan
    tmp = tmp_path_factory.mktemp("nan")
    np.save(tmp / "raw.npy", array)
    with pytest.raises(InputError, match=r"raw.npy: 1 NaN/inf values, first in chunk \("):
        ingest(tmp / "raw.npy", tmp / "s.zarr", policy=ChunkPolicy(target_mib=0.001))
    assert not (tmp / "s.zarr").exists()


CHAINS = st.lists(st.sampled_from([
    {"step": "bin", "factor": 2},
    {"step": "normalize", "method": "sum"},
    {"step": "normalize", "method": "max"},
    {"step": "scale", "method": "sqrt"},
    {"step": "anscombe"},
    {"step": "poisson_weight"},
    {"step": "mask_channels", "ranges": [], "auto": True},
]), max_size=3)


def _scan(array: np.ndarray, rows: int, cols: int) -> xr.Dataset:
    import dask.array as da

    energy = np.linspace(400.0, 800.0, array.shape[2])
    signal = da.from_array(array, chunks=(rows, cols, -1))
    return xr.Dataset({"signal": (("y", "x", "energy"), signal)}, coords={"energy": energy},
                      attrs={"kind": "spectrum"})


@QUICK
@given(data=st.data(), shape=st.tuples(st.integers(2, 8), st.integers(2, 8), st.integers(4, 24)),
       chain=CHAINS, nonfinite=st.booleans())
def test_the_chain_in_blocks_equals_the_chain_on_the_whole_scan(data, shape, chain, nonfinite):
    """Blockwise preprocessing (stateful steps merged over blocks) equals the same chain on the
    scan as one block, for any blocking; pixels with NaN are masked (invalid) either way."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    array = rng.poisson(20, shape).astype(np.float32)
    if nonfinite:
        array[rng.random(shape[:2]) < 0.2, rng.integers(shape[2])] = np.nan
    rows, cols = data.draw(st.integers(1, shape[0])), data.draw(st.integers(1, shape[1]))
    with dask.config.set(scheduler="synchronous"):
        try:
            whole = Preprocessor(list(chain)).fit_transform(_scan(array, -1, -1))
        except ConfigError as exc:  # a chain that cannot run (anscombe with poisson_weight)
            assert str(exc).startswith("preprocess.steps"), exc
            return
        blocks = Preprocessor(list(chain)).fit_transform(_scan(array, rows, cols))
        valid, valid_b = whole["valid"].values, blocks["valid"].values
        np.testing.assert_array_equal(valid, valid_b)
        if nonfinite:
            assert not valid[np.isnan(array).any(axis=2)].any()
        np.testing.assert_allclose(blocks["features"].values[valid_b],
                                   whole["features"].values[valid], rtol=2e-5, atol=1e-6)
