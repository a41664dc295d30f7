import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from emscale.errors import ConfigError, OutputExistsError, StoreError
from emscale.store import (
    EVERY_CHUNK,
    MIB,
    ChunkPolicy,
    feature_matrix,
    navigation_chunks,
    open_scan,
    validate_scan,
    write_scan,
)


def spectrum_ds(ny=12, nx=10, ne=32, dtype=np.uint16, seed=0):
    data = np.random.default_rng(seed).poisson(20, (ny, nx, ne)).astype(dtype)
    return xr.Dataset(
        {"signal": (("y", "x", "energy"), data)},
        coords={"energy": ("energy", np.linspace(-0.2, 10, ne), {"units": "keV"})},
        attrs={"kind": "spectrum"},
    )


def test_chunk_policy_row_blocks_for_spectrum_images():
    # 1024 channels float32 = 4 KiB per pixel; 64 MiB = 16 rows of 1024 pixels
    assert navigation_chunks((1024, 1024), (1024,)) == (16, 1024)
    rows, cols = navigation_chunks((1000, 1000), (1024,))
    assert cols == 1000 and 32 * MIB <= rows * cols * 4096 <= 128 * MIB
    # balanced: 100 rows at a target of 16 -> 7 blocks of at most 15 rows, none a sliver
    rows, _ = navigation_chunks((100, 1024), (1024,))
    n = -(-100 // rows)
    assert 100 - (n - 1) * rows >= rows // 2


def test_chunk_policy_tiles_when_a_row_exceeds_the_maximum():
    # 256x256 float32 patterns: 256 KiB per pixel, a 1024-wide row is 256 MiB > 128 MiB
    rows, cols = navigation_chunks((1024, 1024), (256, 256))
    assert cols < 1024 and rows > 1
    assert 32 * MIB <= rows * cols * 256 * 1024 <= 128 * MIB
    # a 512-wide row is exactly 128 MiB: whole rows
    assert navigation_chunks((512, 512), (256, 256)) == (1, 512)


def test_chunk_policy_rejects_bad_values():
    with pytest.raises(ConfigError, match="chunk_mib"):
        ChunkPolicy(target_mib=0)
    with pytest.raises(ConfigError, match="chunk_mib"):
        ChunkPolicy(target_mib=float("nan"))


def test_write_open_round_trip(tmp_path):
    ds = spectrum_ds()
    write_scan(ds, tmp_path / "s.zarr", policy=ChunkPolicy(target_mib=4 * 10 * 32 * 4 / MIB))
    back = open_scan(tmp_path / "s.zarr")
    assert back.signal.dtype == np.uint16
    assert back.signal.chunks[0] == (4, 4, 4) and back.signal.chunks[2] == (32,)
    np.testing.assert_array_equal(back.signal.values, ds.signal.values)
    np.testing.assert_allclose(back.energy.values, ds.energy.values)
    assert back.energy.attrs["units"] == "keV"
    assert zarr.open_group(str(tmp_path / "s.zarr"), mode="r").metadata.zarr_format == 3


def test_write_refuses_existing_output_and_leaves_it(tmp_path):
    write_scan(spectrum_ds(), tmp_path / "s.zarr")
    with pytest.raises(OutputExistsError):
        write_scan(spectrum_ds(seed=1), tmp_path / "s.zarr")
    np.testing.assert_array_equal(open_scan(tmp_path / "s.zarr").signal.values, spectrum_ds().signal.values)


def test_failed_write_leaves_nothing(tmp_path):
    ds = spectrum_ds()

    def fail(tmp, results):
        assert tmp.exists()
        raise RuntimeError("rejected")

    with pytest.raises(RuntimeError, match="rejected"):
        write_scan(ds, tmp_path / "s.zarr", finalize=fail)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mutate, message", [
    (lambda ds: ds.rename({"signal": "data"}), "no data variable 'signal'"),
    (lambda ds: ds.assign_attrs(kind="image"), "kind"),
    (lambda ds: ds.transpose("energy", "y", "x"), "expected"),
    (lambda ds: ds.isel(y=slice(0, 0)), "empty scan"),
    (lambda ds: ds.drop_vars("energy"), "energy"),
    (lambda ds: ds.assign(signal=ds.signal.astype(complex)), "dtype"),
    (lambda ds: ds.chunk({"energy": 8}), "split"),
])
def test_validate_names_the_problem(mutate, message):
    with pytest.raises(StoreError, match=message):
        validate_scan(mutate(spectrum_ds()), "scan.zarr")


def test_open_rejects_non_stores(tmp_path):
    with pytest.raises(StoreError, match=r"not a Zarr store \(no zarr.json in it\)"):
        (tmp_path / "junk.zarr").mkdir()
        open_scan(tmp_path / "junk.zarr")
    spectrum_ds().to_zarr(tmp_path / "v2.zarr", zarr_format=2, consolidated=False)
    with pytest.raises(StoreError, match="Zarr format 2"):
        open_scan(tmp_path / "v2.zarr")


def test_feature_matrix_rows_and_tiles(sync_scheduler):
    ds = spectrum_ds(ny=7, nx=6, ne=5)
    flat_rows = feature_matrix(ds.chunk({"y": 3, "x": -1}))
    assert flat_rows.dtype == np.float32 and flat_rows.chunks[0] == (18, 18, 6)
    np.testing.assert_array_equal(flat_rows.compute(), ds.signal.values.reshape(42, 5))
    # tiles: block order, each block row-major inside
    tiled = ds.chunk({"y": 4, "x": 4})
    flat = feature_matrix(tiled).compute()
    blocks = [ds.signal.values[y:y + 4, x:x + 4].reshape(-1, 5) for y in (0, 4) for x in (0, 4)]
    np.testing.assert_array_equal(flat, np.concatenate(blocks))


def test_a_map_on_the_signal_s_blocks_is_sliced_from_the_blocks_that_hold_them(sync_scheduler):
    """``map_on_blocks``: a map read in merged blocks (unions of the signal's tiles) lines up
    with ``feature_matrix``'s rows by slicing, one task per signal block; a map whose blocks
    cut through the signal's is rechunked, with the same values."""
    import dask.array as da

    from emscale.store import map_on_blocks

    ds = spectrum_ds(ny=13, nx=7, ne=3).chunk({"y": 4, "x": 3})  # partial tiles at both edges
    labels = np.arange(13 * 7).reshape(13, 7) % 5
    order = feature_matrix(ds.assign(signal=(("y", "x", "channel"),
                                             np.repeat(labels[..., None], 3, axis=2)))
                           .chunk({"y": 4, "x": 3}))
    expected = order[:, 0].compute().astype(np.int32)
    merged = da.from_array(labels, chunks=(8, 6))  # two signal tiles a side
    flat = map_on_blocks(merged, ds["signal"])
    assert flat.dtype == np.int32 and flat.chunks[0] == order.chunks[0]
    assert len(flat.dask.layers[flat.name]) == flat.numblocks[0]  # a task per block
    np.testing.assert_array_equal(flat.compute(), expected)
    across = map_on_blocks(da.from_array(labels, chunks=(5, 5)), ds["signal"])
    assert not across.name.startswith("map-on-blocks")
    np.testing.assert_array_equal(across.compute(), expected)
    np.testing.assert_array_equal(map_on_blocks(labels, ds["signal"]).compute(), expected)


def test_feature_matrix_on_local_cluster(local_client):
    ds = spectrum_ds(ny=20, nx=9, ne=16).chunk({"y": 6, "x": -1})
    flat = feature_matrix(ds)
    total = flat.sum(axis=0).compute()
    np.testing.assert_allclose(total, ds.signal.values.reshape(-1, 16).sum(0))


def _tiled_store(path, dtype=np.uint16, compressors=(BloscCodec(cname="lz4", shuffle="bitshuffle"),),
                 every_chunk=True):
    """A scan store whose chunks split y and x, with partial chunks at both far edges."""
    ds = spectrum_ds(ny=13, nx=7, dtype=dtype)
    if every_chunk:
        ds.attrs[EVERY_CHUNK] = True
    ds.to_zarr(path, zarr_format=3, consolidated=False,
               encoding={"signal": {"chunks": (5, 4, 32), "compressors": compressors}})
    return ds


@pytest.mark.parametrize("dtype, compressors", [(np.uint16, (BloscCodec(),)),
                                                (np.float32, (BloscCodec(),)), (np.uint8, None)])
def test_scan_chunks_are_read_from_their_files(tmp_path, dtype, compressors):
    ds = _tiled_store(tmp_path / "s.zarr", dtype, compressors)
    back = open_scan(tmp_path / "s.zarr")
    assert back.signal.data.name.startswith("read-signal")  # not through zarr
    assert back.signal.chunks == ((5, 5, 3), (4, 3), (32,)) and back.signal.dtype == dtype
    np.testing.assert_array_equal(back.signal.values, ds.signal.values)
    # written by emscale (Blosc), and read back the same under distributed's pickling too
    write_scan(ds, tmp_path / "w.zarr", policy=ChunkPolicy(target_mib=4 * 7 * 32 * 4 / MIB))
    written = open_scan(tmp_path / "w.zarr")
    assert written.attrs[EVERY_CHUNK] is True  # a missing chunk of it will be an error
    np.testing.assert_array_equal(written.signal.values, ds.signal.values)


def test_other_codecs_are_read_through_zarr(tmp_path):
    from zarr.codecs import ZstdCodec

    ds = _tiled_store(tmp_path / "z.zarr", compressors=[ZstdCodec()])
    back = open_scan(tmp_path / "z.zarr")
    assert not back.signal.data.name.startswith("read-signal")
    np.testing.assert_array_equal(back.signal.values, ds.signal.values)


def test_a_chunk_changed_in_place_fails_its_checksum(tmp_path):
    """LZ4 has no checksum: one bit flipped in a stored chunk decoded to wrong numbers without
    a word. emscale's stores end each chunk in a CRC-32C, checked on every read."""
    from zarr.codecs import Crc32cCodec

    ds = spectrum_ds(ny=13, nx=7)
    write_scan(ds, tmp_path / "s.zarr", policy=ChunkPolicy(target_mib=0.002))
    assert isinstance(zarr.open_array(str(tmp_path / "s.zarr" / "signal")).compressors[-1],
                      Crc32cCodec)
    back = open_scan(tmp_path / "s.zarr")
    assert back.signal.data.name.startswith("read-signal")  # the direct reads check it too
    np.testing.assert_array_equal(back.signal.values, ds.signal.values)
    chunk = tmp_path / "s.zarr" / "signal" / "c" / "1" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 1
    chunk.write_bytes(bytes(raw))  # same length: only a checksum tells
    with pytest.raises(StoreError, match=r"c/1/0/0: chunk \(1, 0, 0\) \(pixels y \d+:\d+, x 0:7\)"
                                         r": its checksum does not match"):
        open_scan(tmp_path / "s.zarr").signal.values


def test_a_lost_or_damaged_chunk_is_an_error_naming_it(tmp_path):
    _tiled_store(tmp_path / "s.zarr")
    chunk = tmp_path / "s.zarr" / "signal" / "c" / "1" / "1" / "0"
    raw = chunk.read_bytes()
    chunk.write_bytes(raw[: len(raw) // 2])  # truncated: a disk that filled up
    with pytest.raises(StoreError,
                       match=r"c/1/1/0: chunk \(1, 1, 0\) \(pixels y 5:10, x 4:7\) cannot be "
                             r"decoded.*ingest the scan again"):
        open_scan(tmp_path / "s.zarr").signal.values
    chunk.unlink()  # lost: zarr would read its fill value, zeros that become a phase
    with pytest.raises(StoreError,
                       match=r"c/1/1/0: chunk \(1, 1, 0\) \(pixels y 5:10, x 4:7\) is missing.*"
                             r"ingest the scan again"):
        open_scan(tmp_path / "s.zarr").signal.values
    # a store that does not say it holds every chunk (written by another tool, or by emscale
    # before it wrote them all) may leave out a chunk of fill values: read as zarr reads it
    ds = _tiled_store(tmp_path / "other.zarr", every_chunk=False)
    (tmp_path / "other.zarr" / "signal" / "c" / "1" / "1" / "0").unlink()
    back = open_scan(tmp_path / "other.zarr").signal.values
    np.testing.assert_array_equal(back[5:10, 4:], 0)
    np.testing.assert_array_equal(back[:5], ds.signal.values[:5])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_rows_is_isfinite_all_along_each_row(dtype):
    """The product with ones finds NaN and infinities; a row of huge finite values whose sum
    overflows is still finite."""
    from emscale.store import finite_rows

    x = np.random.default_rng(0).normal(size=(50, 7)).astype(dtype)
    x[3, 2], x[10, 0], x[11, 6], x[12, :2] = np.nan, np.inf, -np.inf, (np.inf, -np.inf)
    x[20] = np.finfo(dtype).max / 2  # its sum overflows
    np.testing.assert_array_equal(finite_rows(x), np.isfinite(x).all(axis=1))
    assert finite_rows(x)[20] and finite_rows(x).sum() == 46
