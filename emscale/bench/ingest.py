"""``emscale bench ingest``: peak memory and throughput of a streamed ingest of a large raw file.

The raw file is a ``.npy`` of uint16 Poisson counts (a spectrum image of 1024 channels), written
block by block so that generating it needs no memory either. The ingest runs in a fresh child
process which reports its own peak resident memory (``emscale.bench.memory``: the kernel's
high-water mark, memory-mapped file pages included) and its resident memory after imports, so the
figure is the whole process, not an estimate.
"""

from __future__ import annotations

import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from emscale.bench.memory import run_measured

CHANNELS = 1024
GEN_ROWS_BYTES = 64 << 20


def write_raw_npy(path: Path, shape: tuple[int, int, int], seed: int = 0) -> int:
    """Write a uint16 counts .npy of ``shape`` in row blocks; return its size in bytes."""
    ny, nx, nc = shape
    rng = np.random.default_rng(seed)
    energy = np.linspace(0, 1, nc, dtype=np.float32)
    templates = np.stack([30 * np.exp(-3 * energy) + 20 * (energy > c) for c in (0.3, 0.5, 0.7)])
    rows = max(1, GEN_ROWS_BYTES // (nx * nc * 2))
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.dtype(np.uint16).str, "fortran_order": False, "shape": shape})
        for y0 in range(0, ny, rows):
            n = min(rows, ny - y0)
            phase = (np.arange(y0, y0 + n)[:, None] * 3 // ny + np.zeros((1, nx), int)) % 3
            block = rng.poisson(templates[phase]).astype(np.uint16)
            f.write(block.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def evict_from_page_cache(path: Path) -> None:
    """Drop a (synced) file's pages from the OS page cache so that the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def shape_for_bytes(n_bytes: float, channels: int = CHANNELS) -> tuple[int, int, int]:
    pixels = int(n_bytes // (channels * 2))
    nx = 512 if pixels >= 512 * 4 else 16
    return (max(1, pixels // nx), nx, channels)


@dataclass
class IngestBench:
    raw_bytes: int
    shape: tuple[int, ...]
    chunk_mib: float
    seconds: float
    mb_per_s: float
    peak_rss_mb: float
    baseline_rss_mb: float
    cold_cache: bool
    environment: dict

    @property
    def peak_over_baseline_mb(self) -> float:
        return self.peak_rss_mb - self.baseline_rss_mb

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_over_baseline_mb": self.peak_over_baseline_mb}

    def table(self) -> str:
        return "\n".join([
            f"raw file        {self.raw_bytes / 1e9:.2f} GB uint16 .npy, shape {self.shape}",
            f"chunk target    {self.chunk_mib:g} MiB float32",
            f"page cache      {'raw file evicted before the run (read from disk)' if self.cold_cache else 'warm'}",
            f"time            {self.seconds:.1f} s",
            f"throughput      {self.mb_per_s:.0f} MB/s (raw bytes read, hashed, checked, written)",
            f"peak RSS        {self.peak_rss_mb:.0f} MB (process after imports: "
            f"{self.baseline_rss_mb:.0f} MB, +{self.peak_over_baseline_mb:.0f} MB for the ingest)",
            f"environment     {self.environment}",
        ])


def measure_ingest(raw: Path, out: Path, chunk_mib: float) -> dict:
    """Run ``emscale.ingest`` in a fresh process; return its report plus peak/baseline RSS."""
    m = run_measured(
        "from emscale.ingest import ingest\nfrom emscale.store import ChunkPolicy",
        f"result = ingest({str(raw)!r}, {str(out)!r}, "
        f"policy=ChunkPolicy({chunk_mib!r}, max(128.0, {chunk_mib!r}))).to_dict()",
    )
    return {**m["result"], "peak_rss": m["peak_rss"], "baseline_rss": m["baseline_rss"]}


def environment() -> dict:
    import dask

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "dask": dask.__version__,
            "scheduler": "threads", "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "")}


def run_ingest_bench(size_gb: float, workdir: Path | None = None, chunk_mib: float = 64.0,
                     cold: bool = True) -> IngestBench:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        raw = Path(tmp) / "raw.npy"
        shape = shape_for_bytes(size_gb * 1e9)
        size = write_raw_npy(raw, shape)
        if cold:
            evict_from_page_cache(raw)
        r = measure_ingest(raw, Path(tmp) / "scan.zarr", chunk_mib)
    return IngestBench(raw_bytes=size, shape=shape, chunk_mib=chunk_mib, seconds=r["seconds"],
                       mb_per_s=r["mb_per_s"], peak_rss_mb=r["peak_rss"] / 1e6,
                       baseline_rss_mb=r["baseline_rss"] / 1e6, cold_cache=cold,
                       environment=environment())
