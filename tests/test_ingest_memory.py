"""Peak memory of a streamed ingest depends on the chunk size, not on the file size."""

from emscale.bench.ingest import measure_ingest, write_raw_npy

CHUNK_MIB = 2.0


def test_peak_memory_is_bounded_by_chunks_not_file_size(tmp_path):
    peaks = {}
    for n_rows in (64, 320):  # 64 and 320 MiB-rows of 512 x 1024 uint16: 64 MB and 335 MB files
        raw = tmp_path / f"raw{n_rows}.npy"
        size = write_raw_npy(raw, (n_rows, 512, 1024))
        r = measure_ingest(raw, tmp_path / f"s{n_rows}.zarr", CHUNK_MIB)
        peaks[size] = r["peak_rss"] - r["baseline_rss"]
        raw.unlink()
    (small, p_small), (big, p_big) = sorted(peaks.items())
    assert big > 30 * CHUNK_MIB * 2**20, "the big file is many chunk budgets"
    # five times the data, (almost) the same memory: at most 30 MB more, far below the file size
    assert p_big - p_small < 30e6, peaks
    assert p_big < big / 3, peaks


def test_the_ingest_limits_are_measured_on_the_store_as_written(tmp_path):
    """``bench ingest``'s codec limit re-encodes chunks exactly as the store holds them (same
    codec settings: the same bytes), and both limits are rates of the bytes involved."""
    import math

    from emscale.bench.ingest import codec_encode_rate, disk_read_rate, store_encoder

    raw = tmp_path / "raw.npy"
    write_raw_npy(raw, (32, 512, 64))
    measure_ingest(raw, tmp_path / "s.zarr", CHUNK_MIB)
    import numcodecs.blosc

    chunk = next(p for p in sorted((tmp_path / "s.zarr" / "signal" / "c").rglob("*")) if p.is_file())
    stored = chunk.read_bytes()
    assert store_encoder(tmp_path / "s.zarr")(numcodecs.blosc.decompress(stored)) == stored
    for rate in (disk_read_rate(raw), codec_encode_rate(tmp_path / "s.zarr")):
        assert math.isfinite(rate) and rate > 0
