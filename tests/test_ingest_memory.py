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
