"""``emscale bench ingest``: peak memory and throughput of a streamed ingest of a large raw file,
against the limits of that work measured in the same run: reading the raw file from disk (page
cache evicted, 64 MiB reads) and encoding its chunks with the store's codec on all cores (Blosc's
own threads off, no Dask, the chunks decoded beforehand). Ingest's limit is the lower of the two.

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
import time
from concurrent.futures import ThreadPoolExecutor
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


def disk_read_rate(path: Path, block: int = 64 << 20) -> float:
    """MB/s of reading ``path`` from disk in ``block``-sized reads (evicted before and after)."""
    evict_from_page_cache(path)
    n = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(block):
            n += len(chunk)
    seconds = time.perf_counter() - t0
    evict_from_page_cache(path)
    return n / seconds / 1e6


def store_encoder(store: Path):
    """A function that encodes a raw chunk as the scan store's ``signal`` codecs (Blosc, CRC)
    do."""
    import numcodecs.blosc
    import zarr

    import google_crc32c
    from zarr.codecs import Crc32cCodec

    compressors = zarr.open_array(str(store / "signal"), mode="r").compressors
    codec = compressors[0]  # Blosc, then (stores written from issue 17 on) a CRC-32C
    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[str(codec.shuffle.value)]
    cname = str(codec.cname.value).encode()

    def encode(raw):
        out = numcodecs.blosc.compress(raw, cname, codec.clevel, shuffle, codec.blocksize,
                                       codec.typesize)
        if isinstance(compressors[-1], Crc32cCodec):
            out += google_crc32c.value(out).to_bytes(4, "little")
        return out

    return encode


def codec_encode_rate(store: Path, max_bytes: int = 2 << 30) -> float:
    """MB/s (of raw chunk bytes) of encoding the scan store's chunks with its own codec settings,
    a thread per core (Blosc's threads off, no Dask); the chunks (up to ``max_bytes``) are
    decoded into memory first, so only the encode is timed."""
    import numcodecs.blosc

    encode = store_encoder(store)
    chunks, total = [], 0
    for path in sorted((store / "signal" / "c").rglob("*")):
        if path.is_file() and total < max_bytes:
            # (a CRC-32C after the Blosc frame is left out: Blosc reads its own length)
            chunks.append(numcodecs.blosc.decompress(path.read_bytes()))
            total += len(chunks[-1])
    old = numcodecs.blosc.use_threads
    numcodecs.blosc.use_threads = False
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(encode, chunks))
        return total / (time.perf_counter() - t0) / 1e6
    finally:
        numcodecs.blosc.use_threads = old


def sha256_rate(n_bytes: int = 256 << 20) -> float:
    """MB/s of sha256 on one core (in memory): the hash is one sequential stream per file."""
    import hashlib

    data = np.random.default_rng(0).integers(0, 255, n_bytes, dtype=np.uint8)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for start in range(0, n_bytes, 8 << 20):
        h.update(data[start:start + (8 << 20)])
    return n_bytes / (time.perf_counter() - t0) / 1e6


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
    disk_read_mb_per_s: float = float("nan")
    codec_encode_mb_per_s: float = float("nan")
    sha256_mb_per_s: float = float("nan")

    @property
    def limit_mb_per_s(self) -> float:
        return min(self.disk_read_mb_per_s, self.codec_encode_mb_per_s)

    @property
    def ratio_to_limit(self) -> float:
        return self.mb_per_s / self.limit_mb_per_s

    @property
    def cpu_floor_mb_per_s(self) -> float:
        """Encoding every chunk and hashing the file, both on all cores: the CPU work an ingest
        cannot skip (the store's codec; the sha256 the scan store's provenance records)."""
        cores = self.environment.get("cpus") or 1
        return 1 / (1 / self.codec_encode_mb_per_s + 1 / (cores * self.sha256_mb_per_s))

    @property
    def ratio_to_hashing_limit(self) -> float:
        return self.mb_per_s / min(self.disk_read_mb_per_s, self.cpu_floor_mb_per_s)

    @property
    def peak_over_baseline_mb(self) -> float:
        return self.peak_rss_mb - self.baseline_rss_mb

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_over_baseline_mb": self.peak_over_baseline_mb,
                "limit_mb_per_s": self.limit_mb_per_s, "ratio_to_limit": self.ratio_to_limit,
                "cpu_floor_mb_per_s": self.cpu_floor_mb_per_s,
                "ratio_to_hashing_limit": self.ratio_to_hashing_limit}

    def table(self) -> str:
        return "\n".join([
            f"raw file        {self.raw_bytes / 1e9:.2f} GB uint16 .npy, shape {self.shape}",
            f"chunk target    {self.chunk_mib:g} MiB float32",
            f"page cache      {'raw file evicted before the run (read from disk)' if self.cold_cache else 'warm'}",
            f"time            {self.seconds:.1f} s",
            f"throughput      {self.mb_per_s:.0f} MB/s (raw bytes read, hashed, checked, written)",
            f"limits          disk read {self.disk_read_mb_per_s:.0f} MB/s (cold), codec encode "
            f"{self.codec_encode_mb_per_s:.0f} MB/s (all cores): ingest at "
            f"{100 * self.ratio_to_limit:.0f} % of the lower",
            f"with the hash   sha256 {self.sha256_mb_per_s:.0f} MB/s on one core; encode + hash on "
            f"all cores {self.cpu_floor_mb_per_s:.0f} MB/s: ingest at "
            f"{100 * self.ratio_to_hashing_limit:.0f} % of min(disk, that)",
            f"peak RSS        {self.peak_rss_mb:.0f} MB (process after imports: "
            f"{self.baseline_rss_mb:.0f} MB, +{self.peak_over_baseline_mb:.0f} MB for the ingest)",
            f"environment     {self.environment}",
        ])


def measure_ingest(raw: Path, out: Path, chunk_mib: float) -> dict:
    """Run ``emscale.ingest`` in a fresh process; return its report plus peak/baseline RSS."""
    m = run_measured(
        # distributed is imported on first use by xarray's Zarr writer: start-up, not streaming
        "from emscale.ingest import ingest\nfrom emscale.store import ChunkPolicy\n"
        "import distributed",
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
        disk = disk_read_rate(raw)
        if cold:
            evict_from_page_cache(raw)
        r = measure_ingest(raw, Path(tmp) / "scan.zarr", chunk_mib)
        encode = codec_encode_rate(Path(tmp) / "scan.zarr")
    return IngestBench(disk_read_mb_per_s=disk, codec_encode_mb_per_s=encode,
                       sha256_mb_per_s=sha256_rate(), raw_bytes=size, shape=shape,
                       chunk_mib=chunk_mib, seconds=r["seconds"],
                       mb_per_s=r["mb_per_s"], peak_rss_mb=r["peak_rss"] / 1e6,
                       baseline_rss_mb=r["baseline_rss"] / 1e6, cold_cache=cold,
                       environment=environment())
