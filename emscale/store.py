"""The scan store (DESIGN.md section 2): a Zarr v3 directory holding an xarray Dataset.

One data variable ``signal`` with navigation dims first (``y``, ``x``) and signal dims last
(``energy`` for spectrum images, ``ky``, ``kx`` for 4D-STEM). Synthetic scans add the ground truth
``clean`` (same dims as ``signal``) and ``label`` (``y``, ``x``; -1 marks anomalous pixels).

Chunk policy
------------
Signal dims are never split. The navigation is split into blocks that hold about
``ChunkPolicy.target_mib`` (default 64 MiB, kept within 32-128 MiB) *as float32*, the dtype every
computation uses, so that the memory one task needs is the same whatever the stored dtype. Blocks
are whole rows of the scan when a row fits under the maximum (a row-major raw file is then read
contiguously and the flat pixel view is in plain row-major order), otherwise square-ish tiles of
rows. Block sizes are balanced so that the last block is not a sliver. A scan smaller than one
target block is a single block; tests and small demos pass a smaller target to get several.

Counts stay in their stored dtype on disk (uint16/uint32/float32), compressed with Blosc-LZ4 and
bit-shuffle, which decodes about 3x and encodes about 8x faster than Zarr's default zstd on these
data (measured, DESIGN.md section 6).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from zarr.codecs import BloscCodec, Crc32cCodec

from emscale.atomic import atomic_directory
from emscale.errors import ConfigError, InputError, StoreError

log = logging.getLogger(__name__)

NAV_DIMS = ("y", "x")
SIGNAL_DIMS = {"spectrum": ("energy",), "diffraction": ("ky", "kx")}
STORED_DTYPES = (np.uint8, np.uint16, np.uint32, np.int16, np.int32, np.float32, np.float64)
COMPUTE_DTYPE = np.float32
MIB = 1 << 20


# Every chunk is written, even one that holds only the fill value: zarr's check for that
# (np.array_equal against a broadcast scalar) cost 4x the Blosc encode of a 32 MiB uint16 chunk
# (ingest of 4 GB: 12.5 s, 80 % of it in that check), and a store with every chunk present
# tells a missing chunk from an empty one.
WRITE_EMPTY_CHUNKS = True
# the scan-store attribute that says so (stores written before it may leave out a chunk that
# holds only the fill value, which then reads as that)
EVERY_CHUNK = "every_chunk_written"


def default_compressors(itemsize: int) -> tuple:
    """Blosc (lz4, bitshuffle), then a CRC-32C of the compressed bytes: LZ4 has no checksum of
    its own, so a chunk changed or damaged in place would decode to wrong numbers silently
    (google-crc32c, a Zarr dependency, runs at ~14 GB/s: nothing against the decode)."""
    return (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=itemsize),
            Crc32cCodec())


@dataclass(frozen=True)
class ChunkPolicy:
    """How big a navigation block is, in MiB of float32 (see the module docstring)."""

    target_mib: float = 64.0
    max_mib: float = 128.0

    @classmethod
    def of(cls, target_mib: float) -> "ChunkPolicy":
        """Blocks of about ``target_mib`` MiB, at most 128 MiB or the target if larger."""
        return cls(target_mib=target_mib, max_mib=max(128.0, target_mib))

    def __post_init__(self) -> None:
        if not (self.target_mib > 0 and math.isfinite(self.target_mib)):
            raise ConfigError(f"chunk_mib: must be a positive number, got {self.target_mib!r}")
        if self.max_mib < self.target_mib:
            raise ConfigError(
                f"chunk_mib: target {self.target_mib} MiB is above the maximum {self.max_mib} MiB"
            )


def _balanced(total: int, block: int) -> int:
    """The block size that splits ``total`` into as many blocks as ``block`` does, evenly."""
    block = max(1, min(block, total))
    n = math.ceil(total / block)
    return math.ceil(total / n)


def navigation_chunks(
    nav_shape: tuple[int, int],
    signal_shape: tuple[int, ...],
    policy: ChunkPolicy | None = None,
) -> tuple[int, int]:
    """Navigation block shape ``(rows, cols)`` for a scan, following the chunk policy."""
    policy = policy or ChunkPolicy()
    ny, nx = nav_shape
    pixel_bytes = int(np.prod(signal_shape)) * np.dtype(COMPUTE_DTYPE).itemsize
    pixels = max(1, int(policy.target_mib * MIB // pixel_bytes))
    if nx * pixel_bytes <= policy.max_mib * MIB:  # whole rows
        return _balanced(ny, max(1, pixels // nx)), nx
    side = max(1, int(math.sqrt(pixels)))
    return _balanced(ny, side), _balanced(nx, max(1, pixels // side))


def validate_scan(ds: xr.Dataset, source: str | os.PathLike = "<dataset>") -> str:
    """Check a Dataset against the scan-store contract; return its kind or raise StoreError."""
    where = str(source)
    if "signal" not in ds.data_vars:
        raise StoreError(f"{where}: no data variable 'signal' (found {sorted(ds.data_vars)})")
    sig = ds["signal"]
    kind = ds.attrs.get("kind")
    if kind not in SIGNAL_DIMS:
        raise StoreError(f"{where}: attrs['kind'] must be 'spectrum' or 'diffraction', got {kind!r}")
    expected = NAV_DIMS + SIGNAL_DIMS[kind]
    if sig.dims != expected:
        raise StoreError(f"{where}: signal has dims {sig.dims}, expected {expected} for a {kind} scan")
    empty = [d for d, n in sig.sizes.items() if n == 0]
    if empty:
        raise StoreError(f"{where}: empty scan (dimension {', '.join(empty)} has length 0)")
    if not any(np.dtype(sig.dtype) == np.dtype(t) for t in STORED_DTYPES):
        raise StoreError(f"{where}: signal dtype {sig.dtype} is not a supported count dtype")
    if sig.chunks is not None:
        for dim, chunks in zip(sig.dims, sig.chunks):
            if dim not in NAV_DIMS and len(chunks) > 1:
                raise StoreError(f"{where}: signal dimension {dim!r} is split into chunks {chunks}")
    if kind == "spectrum" and "energy" not in ds.coords:
        raise StoreError(f"{where}: spectrum scan without an 'energy' coordinate")
    for name, dims in (("clean", expected), ("label", NAV_DIMS)):
        if name in ds.data_vars and ds[name].dims != dims:
            raise StoreError(f"{where}: {name} has dims {ds[name].dims}, expected {dims}")
    return kind


SCAN_STORE = "scan_store"  # the key of a scan's store path in the Dataset's encoding


def not_a_zarr_group(path: Path, exc: Exception) -> str:
    """Why zarr could not open ``path`` as a group, in a user's words."""
    if path.is_file():
        return "a file, not a Zarr store (a directory)"
    if (path / ".zgroup").exists() or (path / ".zarray").exists():
        return "a Zarr v2 store; scan stores are Zarr v3: convert it with 'emscale ingest'"
    if not (path / "zarr.json").exists():
        return "not a Zarr store (no zarr.json in it)"
    if isinstance(exc, json.JSONDecodeError):
        return f"its zarr.json is not valid JSON ({exc}): the store is damaged"
    return f"not a readable Zarr store ({type(exc).__name__}: {exc})"


def open_scan(path: str | os.PathLike, validate: bool = True) -> xr.Dataset:
    """Open a scan store lazily (dask-backed, chunks as stored) and check its contract."""
    path = Path(path).absolute()  # the tasks that read it may run on other hosts
    if not path.exists():
        raise InputError(f"{path}: no such scan store")
    try:
        meta = zarr.open_group(str(path), mode="r")
        fmt = meta.metadata.zarr_format
    except Exception as exc:  # zarr raises several types for "not a group"
        raise StoreError(f"{path}: {not_a_zarr_group(path, exc)}") from None
    if fmt != 3:
        raise StoreError(f"{path}: Zarr format {fmt}; scan stores are Zarr v3 (use 'emscale ingest')")
    try:
        ds = xr.open_zarr(str(path), consolidated=False, chunks={}, zarr_format=3)
    except Exception as exc:
        if "checksum" in str(exc):  # a coordinate (read here) changed or damaged in place
            from emscale.chunk_files import damaged_chunk

            bad = damaged_chunk(path)
            if bad is not None:
                raise StoreError(f"{bad}: its checksum does not match: changed or damaged since "
                                 "it was written; the store is damaged: ingest the scan again") \
                    from None
        raise StoreError(f"{path}: cannot open as an xarray dataset ({exc})") from None
    if "signal" in ds and isinstance(ds["signal"].data, da.Array):
        from emscale.chunk_files import direct_array

        # every pass of every stage reads the signal: its chunk files decoded straight into
        # blocks, at the codec's rate (Zarr's own reads took 1.7x as long)
        direct = direct_array(path, "signal", ds["signal"].data,
                              missing_is_fill=not ds.attrs.get(EVERY_CHUNK, False))
        if direct is not None:
            ds["signal"] = ds["signal"].copy(data=direct)
    from emscale.synth import with_generated_clean

    ds = with_generated_clean(ds)
    if validate:
        validate_scan(ds, path)
    ds.encoding[SCAN_STORE] = str(path.resolve())  # where stages can read it again
    return ds


def check_every_chunk(path: str | os.PathLike, ds: xr.Dataset) -> None:
    """Refuse a scan store that says it holds every chunk and lost one: named (file, chunk,
    pixels) before a cluster starts, rather than when a stage reaches it."""
    from emscale.chunk_files import first_missing

    if not ds.attrs.get(EVERY_CHUNK):
        return
    for name in ds.data_vars:
        if (Path(path) / str(name) / "zarr.json").exists():
            missing = first_missing(Path(path) / str(name))
            if missing is not None:
                file, index, pixels = missing
                raise StoreError(f"{file}: chunk {index} ({pixels}) is missing (emscale's stores "
                                 "hold every chunk: this one was lost); ingest the scan again")


def _encoding(ds: xr.Dataset, nav_chunks: tuple[int, int]) -> dict[str, dict[str, Any]]:
    enc = {}
    for name, var in ds.data_vars.items():
        chunks = tuple(
            nav_chunks[NAV_DIMS.index(d)] if d in NAV_DIMS else n for d, n in var.sizes.items()
        )
        enc[name] = {
            "chunks": chunks,
            "compressors": default_compressors(np.dtype(var.dtype).itemsize),
        }
    return {**coordinate_encoding(ds), **enc}


def coordinate_encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """The numeric coordinates checksummed like the data (energy axes, positions): a damaged
    one would calibrate every map wrongly, silently."""
    return {str(name): {"compressors": default_compressors(np.dtype(var.dtype).itemsize)}
            for name, var in ds.coords.items()
            if var.ndim >= 1 and np.dtype(var.dtype).kind in "biuf"}


def write_scan(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    policy: ChunkPolicy | None = None,
    overwrite: bool = False,
    also_compute: tuple = (),
    finalize: Callable[[Path, tuple], None] | None = None,
    progress: bool = False,
) -> tuple:
    """Write a (lazy) scan Dataset as a Zarr v3 scan store, atomically, chunk by chunk.

    ``also_compute`` holds dask collections computed in the same pass over the data (ingest uses
    it for value checks and statistics, so that the input is read once); their results are
    returned. ``finalize(tmp_path, results)`` runs before the store is committed: it may add
    attributes, or raise to reject the data. If anything raises, nothing is left at ``path``.
    """
    kind = validate_scan(ds, path)
    sig = ds["signal"]
    nav = navigation_chunks(
        (sig.sizes["y"], sig.sizes["x"]), tuple(sig.sizes[d] for d in SIGNAL_DIMS[kind]), policy
    )
    ds = ds.chunk({"y": nav[0], "x": nav[1], **{d: -1 for d in SIGNAL_DIMS[kind]}})
    ds = ds.assign_attrs({EVERY_CHUNK: True})  # so a missing chunk is an error when read
    if ds.attrs.get("clean_on_demand") and "clean" in ds:  # regenerated by open_scan
        ds = ds.drop_vars("clean")
    with atomic_directory(path, overwrite=overwrite) as tmp:
        # the metadata and the in-memory variables; xarray's graph for the dask ones is not run
        ds.to_zarr(str(tmp), mode="w-", zarr_format=3, consolidated=False,
                   encoding=_encoding(ds, nav), compute=False, write_empty_chunks=WRITE_EMPTY_CHUNKS)
        stores = [_store_blocks(var.data, str(tmp / str(name)))
                  for name, var in ds.variables.items() if isinstance(var.data, da.Array)]
        (results,) = _compute(_one_graph([*stores, *also_compute]), progress=progress)
        results = results[len(stores):]
        if finalize is not None:
            finalize(tmp, results)
    log.info("wrote %s: %s %s, chunks %s", path, kind, dict(sig.sizes), nav)
    return results


def consolidate(path: Path) -> None:
    """Gather the metadata of a group and everything under it into its zarr.json (Zarr's
    consolidated metadata), so that ``xr.open_zarr`` of a results store's stage group
    (``group=STAGE`` or its path) and ``xr.open_datatree`` read one file and do not warn that
    the store is not consolidated. Redone after every change of a group or its attributes.
    Scan stores are not consolidated: a chunk or array lost from one must show (the
    consolidated listing would still name it)."""
    with warnings.catch_warnings():  # "not part of the Zarr format 3 specification" (yet)
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        zarr.consolidate_metadata(str(path), zarr_format=3)


def _store_blocks(arr: da.Array, target: str) -> da.Array:
    """A task per chunk of ``arr`` that stores it in the Zarr array ``target``."""
    return arr.map_blocks(_store_block, target, da.core.ArraySliceDep(arr.chunks), dtype=np.int8,
                          chunks=tuple((1,) * len(c) for c in arr.chunks),
                          meta=np.empty((0,) * arr.ndim, np.int8), token="store-block")


def _store_block(block: np.ndarray, target: str, region: tuple[slice, ...]) -> np.ndarray:
    z = open_target(target)
    z[region] = np.asarray(block).astype(z.dtype, copy=False)
    return np.zeros((1,) * block.ndim, np.int8)


def _one_graph(collections: list) -> Delayed:
    """The collections as one Delayed (their results in a tuple): their graphs merged as they
    are, so that a task they share (reading a chunk) runs once. ``dask.compute`` of several
    collections optimises each one apart and renames its tasks (dask 2026.8: an xarray
    ``to_zarr``, a ``map_blocks`` and a chain of Delayed over one array read it three times)."""
    graphs, parts = [], []
    for c in collections:
        graphs.append(c.__dask_graph__())
        finalize, extra = c.__dask_postcompute__()
        parts.append((finalize, c.__dask_keys__(), *extra))
    name = "scan-written-" + tokenize(*[c.__dask_tokenize__() for c in collections])
    graph = HighLevelGraph.merge(*graphs)
    graph = HighLevelGraph({**graph.layers, name: {name: (tuple, parts)}},
                           {**graph.dependencies, name: set(graph.layers)})
    return Delayed(name, graph)


_OPENED: dict[str, tuple[tuple[int, int, int], zarr.Array]] = {}


def open_target(target: str) -> zarr.Array:
    """The array at ``target`` for writing, opened once per process while its metadata file is
    the same (inode, size, mtime): opening reads and parses ``zarr.json``, ~2 ms, as much as
    storing a small map's chunk, and a block task stores several."""
    st = os.stat(os.path.join(target, "zarr.json"))
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _OPENED.get(target)
    if hit is None or hit[0] != stamp:
        if len(_OPENED) > 256:  # targets of finished writes: forget them
            _OPENED.clear()
        hit = _OPENED[target] = (stamp, zarr.open_array(target, mode="r+", zarr_format=3)
                                       .with_config({"write_empty_chunks": WRITE_EMPTY_CHUNKS}))
    return hit[1]


def _compute(*collections, progress: bool = False):
    from emscale.progress import compute

    return compute(*collections, description="writing", enabled=progress)


def feature_matrix(scan: xr.Dataset | xr.DataArray, variable: str = "signal") -> da.Array:
    """The flat ``(pixels, features)`` float32 view that the learning stages consume.

    One chunk per navigation block, in block order (row-major within each block); with whole-row
    blocks (the chunk policy's usual case) this is plain row-major pixel order. Signal dims are
    flattened into one feature axis. Nothing is computed or copied until the array is used.
    """
    arr = scan[variable] if isinstance(scan, xr.Dataset) else scan
    data = arr.data if isinstance(arr.data, da.Array) else da.from_array(arr.data, chunks=-1)
    n_nav = 2
    n_features = int(np.prod(data.shape[n_nav:]))
    if any(len(c) > 1 for c in data.chunks[n_nav:]):
        raise StoreError(f"{arr.name}: signal dims are split into several chunks; rechunk first")
    name = f"features-{data.name}"
    dsk, sizes = {}, []
    tail = (0,) * (data.ndim - n_nav)
    for k, (i, j) in enumerate(np.ndindex(*data.numblocks[:n_nav])):
        dsk[(name, k, 0)] = (_flatten_block, (data.name, i, j, *tail), n_features)
        sizes.append(data.chunks[0][i] * data.chunks[1][j])
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[data])
    return da.Array(graph, name, chunks=(tuple(sizes), (n_features,)), dtype=COMPUTE_DTYPE)


def finite_rows(x: np.ndarray) -> np.ndarray:
    """``isfinite(x).all(axis=1)`` of a ``(pixels, features)`` block from one product with ones:
    a NaN or infinity makes its row's sum non-finite (1 against 14 ms a million 4-d codes, whose
    short rows make the reduction slow; 1.6 against 3.4 ms a 65 MB block of 1024 features). The
    rows whose sum is not finite (such values, or an overflow of huge finite ones) are checked
    value by value."""
    with np.errstate(over="ignore", invalid="ignore"):  # (what it looks for)
        finite = np.isfinite(x @ np.ones(x.shape[1], x.dtype))
    odd = np.flatnonzero(~finite)
    if len(odd):
        finite[odd] = np.isfinite(x[odd]).all(axis=1)
    return finite


def _flatten_block(block: np.ndarray, n_features: int) -> np.ndarray:
    return np.asarray(block, dtype=COMPUTE_DTYPE).reshape(-1, n_features)


def map_on_blocks(values, like, dtype=np.int32) -> da.Array:
    """A per-pixel map ``values`` (y, x) as a flat ``(pixels,)`` array in ``feature_matrix``'s
    order on ``like``'s navigation blocks (those of a signal), one task per block: each slices
    the map's block that holds it. Maps are read in merged blocks (``results.READ_BLOCK_MIB``),
    each a union of whole signal blocks; a rechunk (a split, a merge, a copy per block and map)
    took a third of the cluster stage's features pass at 16 GB, in scheduler time. A map whose
    blocks do not hold the signal's whole is rechunked. ``values`` and ``like``: xarray, dask
    or numpy arrays (numpy: one block)."""
    values = getattr(values, "data", values)
    values = values if isinstance(values, da.Array) else da.from_array(np.asarray(values))
    like = getattr(like, "data", like)
    nav = like.chunks[:2] if isinstance(like, da.Array) else tuple((n,) for n in like.shape[:2])
    edges = [np.cumsum((0, *c)) for c in values.chunks]
    targets = [np.cumsum((0, *c)) for c in nav]
    name = f"map-on-blocks-{tokenize(values, nav, np.dtype(dtype).str)}"
    dsk, sizes = {}, []
    for k, (i, j) in enumerate(np.ndindex(len(nav[0]), len(nav[1]))):
        (y0, y1), (x0, x1) = targets[0][i:i + 2], targets[1][j:j + 2]
        bi = int(np.searchsorted(edges[0], y0, side="right")) - 1
        bj = int(np.searchsorted(edges[1], x0, side="right")) - 1
        if y1 > edges[0][bi + 1] or x1 > edges[1][bj + 1]:  # across blocks of the map
            return feature_matrix(xr.DataArray(values, dims=NAV_DIMS).chunk(
                dict(zip(NAV_DIMS, nav))))[:, 0].astype(dtype)
        dsk[(name, k)] = (_flat_slice, (values.name, bi, bj),
                          slice(y0 - edges[0][bi], y1 - edges[0][bi]),
                          slice(x0 - edges[1][bj], x1 - edges[1][bj]), dtype)
        sizes.append((y1 - y0) * (x1 - x0))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[values])
    return da.Array(graph, name, chunks=(tuple(sizes),), dtype=dtype)


def _flat_slice(block: np.ndarray, rows: slice, cols: slice, dtype) -> np.ndarray:
    return np.asarray(block)[rows, cols].astype(dtype).ravel()


def content_stamp(path: str | os.PathLike) -> str:
    """A cheap fingerprint of a file or directory tree's content: its files' relative paths,
    sizes and modification times (ns). A chunk rewritten in place, added or deleted changes it;
    a directory's own mtime does not see a file rewritten inside it. One ``stat`` per file: a
    100 GB store of 32 MiB chunks is about 3200 files, milliseconds."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        h.update(f"{st.st_size} {st.st_mtime_ns}".encode())
        return h.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)}\0{st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def store_size_bytes(path: str | os.PathLike) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total
