"""Stream a raw file into a scan store, chunk by chunk, in one pass over the data.

The pass writes the store and, from the same chunks, counts non-finite and negative values and
computes the input's sha256 (for a ``.npy``; for other formats a thread reads the file beside
it). Peak memory is a few chunks per thread, whatever the file size (``emscale bench ingest``
measures it). Non-finite values are refused (the error names the first chunk that holds them)
unless ``allow_nonfinite``; negative values are counted and recorded, because gain-corrected or
background-subtracted data legitimately hold a few, and the preprocessing stage decides what to
do with them. The input is opened read-only. The pass runs on local threads of the process that
calls it (the raw file is local to it), even when a distributed client is active.

Calibrations given by the caller (``emscale ingest --axis DIM:scale=S,offset=O,units=U``, see
``parse_axis``) become the axes' coordinates exactly as a file's own do (``offset + scale * i``
with a ``units`` attr); they replace a file's calibration of that axis, keys not given kept. A
spectrum's energy axis is stored in the units given or read (eV for EELS, keV as EDS detectors and
rosettasciio give it): crop ranges and reports use the axis's own units.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import dask
import dask.array as da
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
import numpy as np
import xarray as xr
import zarr

from emscale.atomic import check_output_free
from emscale.dask_cluster import keep_freed_chunks
from emscale.errors import ConfigError, EmscaleError, InputError
from emscale.readers import RawScan, linear_coord, open_raw
from emscale.store import (
    NAV_DIMS,
    SIGNAL_DIMS,
    STORED_DTYPES,
    ChunkPolicy,
    navigation_chunks,
    write_scan,
)

log = logging.getLogger(__name__)

HASH_BLOCK = 8 << 20


@dataclass
class IngestReport:
    source: str
    output: str
    format: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    bytes_read: int
    seconds: float
    nonfinite: int
    negative: int
    sha256: str
    stored_dtype: str = ""  # the store's, where the file's is converted (int64 -> int32)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mb_per_s": self.mb_per_s}


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory tree (relative paths and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(HASH_BLOCK):
                h.update(chunk)
    return h.hexdigest()


def file_sha256(data: da.Array, path: Path, offset: int) -> Delayed:
    """sha256 of ``path`` computed from the chunks of ``data`` (the C-ordered array stored at
    byte ``offset`` of it) as they are read for the store, instead of by a second read: a chain
    of one task per band of navigation rows, each feeding its rows to the hash in file order
    (row by row across the band's chunks when a chunk is narrower than the scan), plus the bytes
    before and after the array. Local threads only: the hash object travels along the chain."""
    name = "ingest-sha256-" + tokenize(data.name, str(path), offset)
    tail = (0,) * (data.ndim - 2)
    ny, nx = data.numblocks[:2]
    dsk: dict = {(name, -1): (_hash_start, str(path), offset)}
    for i in range(ny):
        dsk[(name, i)] = (_hash_band, (name, i - 1), *[(data.name, i, j, *tail) for j in range(nx)])
    end = offset + data.nbytes
    dsk[name + "-hex"] = (_hash_end, (name, ny - 1), str(path), end)
    return Delayed(name + "-hex", HighLevelGraph.from_collections(name, dsk, dependencies=[data]),
                   layer=name)


def _hash_start(path: str, offset: int):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(offset))


def _hash_band(h, *blocks):
    if len(blocks) == 1:
        h.update(np.ascontiguousarray(blocks[0]).reshape(-1).view(np.uint8))
    else:
        for row in range(blocks[0].shape[0]):
            for block in blocks:
                h.update(np.ascontiguousarray(block[row]).reshape(-1).view(np.uint8))
    return h


def _hash_end(h, path: str, end: int) -> str:
    with open(path, "rb") as f:
        f.seek(end)
        while chunk := f.read(HASH_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def source_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _block_stats(block: np.ndarray) -> np.ndarray:
    """[non-finite count, negative count] of one block, shaped (1, 1, 2)."""
    if np.issubdtype(block.dtype, np.floating):
        finite = np.isfinite(block)
        nonfinite = block.size - int(np.count_nonzero(finite))
        negative = int(np.count_nonzero(block < 0))
    else:
        nonfinite = 0
        negative = int(np.count_nonzero(block < 0)) if np.issubdtype(block.dtype, np.signedinteger) else 0
    return np.array([nonfinite, negative], dtype=np.int64).reshape(1, 1, 2)


def block_stats(data: da.Array) -> da.Array:
    """Per navigation block ``[non-finite, negative]`` counts: shape (blocks_y, blocks_x, 2)."""
    ny, nx = data.numblocks[:2]
    return da.map_blocks(
        _block_stats, data, dtype=np.int64, drop_axis=list(range(3, data.ndim)),
        chunks=((1,) * ny, (1,) * nx, (2,)), token="ingest-check",
    )


def _first_bad_block(counts: np.ndarray, chunks: tuple) -> str:
    i, j = np.argwhere(counts > 0)[0]
    y0, x0 = sum(chunks[0][:i]), sum(chunks[1][:j])
    return f"chunk ({i}, {j}): y {y0}:{y0 + chunks[0][i]}, x {x0}:{x0 + chunks[1][j]}"


# counts stored in a wider or foreign type than the store keeps: converted when every value fits
NARROWER = {np.dtype(np.int64): np.dtype(np.int32), np.dtype(np.uint64): np.dtype(np.uint32),
            np.dtype(np.int8): np.dtype(np.int16), np.dtype(np.float16): np.dtype(np.float32),
            np.dtype(np.bool_): np.dtype(np.uint8)}


def stored_dtype(dtype: np.dtype, path: Path) -> np.dtype:
    """The dtype a scan store keeps for a raw file's ``dtype``: itself, its native byte order,
    or a narrower integer type (each chunk's values checked to fit); else an error naming the
    file."""
    native = np.dtype(dtype).newbyteorder("=")
    target = NARROWER.get(native, native)
    if not any(target == np.dtype(t) for t in STORED_DTYPES):
        raise InputError(f"{path}: values of type {dtype} cannot be counts (need integers or "
                         "floating point numbers)")
    return target


def _convert_block(block: np.ndarray, target: np.dtype, path: str, block_info=None):
    if np.issubdtype(target, np.integer) and block.size and block.dtype.itemsize > target.itemsize:
        info = np.iinfo(target)
        lo, hi = block.min(), block.max()
        if lo < info.min or hi > info.max:
            (y0, y1), (x0, x1) = block_info[0]["array-location"][:2]
            raise InputError(f"{path}: pixels y {y0}:{y1}, x {x0}:{x1} hold values {lo}..{hi} "
                             f"that do not fit {target} (from {block.dtype}); counts that "
                             "large are not supported")
    return block.astype(target, copy=False)


def to_stored_dtype(data: da.Array, path: Path) -> da.Array:
    target = stored_dtype(data.dtype, path)
    if target == data.dtype:
        return data
    return da.map_blocks(_convert_block, data, target, str(path), dtype=target,
                         name="ingest-convert-" + tokenize(data.name, str(target)))


# --- calibrations and kind given by the caller ---------------------------------------------------

AXIS_KEYS = ("scale", "offset", "units")
AXIS_FORMAT = "DIM:scale=S,offset=O,units=U (e.g. energy:scale=0.01,offset=-0.2,units=keV)"
# --kind: the scan kind, or the signal type of a spectrum image (recorded as ``signal_type``)
KINDS = {"spectrum": ("spectrum", None), "eels": ("spectrum", "EELS"), "eds": ("spectrum", "EDS"),
         "diffraction": ("diffraction", None), "4dstem": ("diffraction", None)}
KIND_WORDS = {"spectrum": "spectrum image (y, x, energy)",
              "diffraction": "4D-STEM scan (y, x, ky, kx)"}


@dataclass(frozen=True)
class AxisCalibration:
    """One axis's calibration given by the caller; ``None``: kept from the file (or the default:
    offset 0, scale 1, no units)."""

    dim: str
    scale: float | None = None
    offset: float | None = None
    units: str | None = None

    def given(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in AXIS_KEYS if getattr(self, k) is not None}


def parse_axis(text: str) -> list[AxisCalibration]:
    """``DIM[,DIM]:KEY=VALUE,...`` (``emscale ingest --axis``), keys scale, offset, units;
    a ConfigError naming the option and the text otherwise. ``y,x:scale=2.5,units=nm`` gives both
    navigation axes the same step."""
    where = f"--axis {text!r}"
    head, sep, rest = text.partition(":")
    dims = [d.strip() for d in head.split(",")]
    if not sep or not all(dims) or not rest.strip():
        raise ConfigError(f"{where}: expected {AXIS_FORMAT}")
    values: dict[str, Any] = {}
    for item in rest.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if key.lower() not in AXIS_KEYS or not eq:
            raise ConfigError(f"{where}: {item.strip()!r} is not KEY=VALUE with KEY one of "
                              f"{', '.join(AXIS_KEYS)}")
        key = key.lower()
        if key in values:
            raise ConfigError(f"{where}: {key} given twice")
        if key == "units":
            values[key] = value
            continue
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {key} {value!r} is not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {key} {value!r} is not a finite number")
        if key == "scale" and number <= 0:
            raise ConfigError(f"{where}: scale must be positive (the step from one pixel or "
                              f"channel to the next), got {value}")
        values[key] = number
    return [AxisCalibration(d, **values) for d in dims]


def check_kind(raw: RawScan, kind: str | None, path: Path) -> None:
    """``--kind`` against what the file holds (its dimensions decide: 3-D is a spectrum image,
    4-D a 4D-STEM scan); records a spectrum's signal type (EELS, EDS)."""
    if kind is None:
        return
    want, signal_type = KINDS[kind.lower()]
    if raw.kind != want:
        raise InputError(f"{path}: --kind {kind}: the file holds a {KIND_WORDS[raw.kind]}, shape "
                         f"{tuple(raw.data.shape)}, not a {KIND_WORDS[want]}")
    if signal_type is not None:
        raw.attrs["signal_type"] = signal_type


def apply_calibrations(raw: RawScan, axes: Sequence[AxisCalibration], path: Path) -> None:
    """The given calibrations into ``raw.coords`` (replacing the file's for those axes)."""
    dims = NAV_DIMS + SIGNAL_DIMS[raw.kind]
    seen: set[str] = set()
    for ax in axes:
        if ax.dim not in dims:
            what = "spectrum image" if raw.kind == "spectrum" else "4D-STEM scan"
            raise InputError(f"{path}: --axis {ax.dim}: no such axis (a {what} has axes "
                             f"{', '.join(dims)})")
        if ax.dim in seen:
            raise ConfigError(f"--axis {ax.dim}: given twice")
        seen.add(ax.dim)
        size = raw.data.shape[dims.index(ax.dim)]
        old, attrs = raw.coords.get(ax.dim, (None, {}))
        if old is not None:
            log.info("%s: the file's calibration of %s replaced by --axis (%s)", path, ax.dim,
                     ax.given())
        if ax.scale is None and ax.offset is None and old is not None:
            values = old  # units only: the file's values (uniform or not) stay
        else:
            offset = ax.offset if ax.offset is not None else \
                float(old[0]) if old is not None else 0.0
            scale = ax.scale if ax.scale is not None else \
                float(old[1] - old[0]) if old is not None and size > 1 else 1.0
            values = linear_coord(size, offset, scale)
        units = ax.units if ax.units is not None else str(attrs.get("units", ""))
        attrs = {k: v for k, v in attrs.items() if k != "calibrated"}
        raw.coords[ax.dim] = (values, {**attrs, "units": units,
                                       "long_name": attrs.get("long_name", ax.dim)})


def to_dataset(raw: RawScan, source: dict[str, Any]) -> xr.Dataset:
    dims = raw.dims
    coords = {d: (d, v, a) for d, (v, a) in raw.coords.items()}
    for dim, size in zip(dims, raw.data.shape):  # uncalibrated axes: pixel/channel index
        coords.setdefault(dim, (dim, np.arange(size, dtype=np.float64),
                                {"units": "", "long_name": dim, "calibrated": False}))
    data_vars = {"signal": (dims, raw.data, {"units": "counts"})}
    data_vars.update({k: v for k, v in raw.extra.items()})
    attrs = {**raw.attrs, "kind": raw.kind, "source": source}
    return xr.Dataset(data_vars, coords=coords, attrs=_json_safe(attrs))


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def ingest(
    raw_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    policy: ChunkPolicy | None = None,
    allow_nonfinite: bool = False,
    nonfinite_remedy: str = "use --allow-nonfinite to keep them for preprocessing to mask",
    axes: Sequence[AxisCalibration] = (),
    kind: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> IngestReport:
    """Stream ``raw_path`` into a new scan store at ``out_path`` (see the module docstring).

    ``nonfinite_remedy`` ends the error that refuses NaN/inf values: the fix in the terms of the
    caller (a command's option, a workflow's field). ``axes`` and ``kind``: see ``parse_axis``
    and ``check_kind``."""
    raw_path, out_path = Path(raw_path), Path(out_path)
    if kind is not None and kind.lower() not in KINDS:
        raise ConfigError(f"--kind {kind!r}: not one of {', '.join(KINDS)}")
    check_output_free(out_path, overwrite, inputs=(raw_path,))

    def chunks_for(shape: tuple[int, ...]) -> tuple:
        rows, cols = navigation_chunks(tuple(shape[:2]), tuple(shape[2:]), policy)
        return (rows, cols) + tuple(shape[2:])

    raw = open_raw(raw_path, chunks_for)
    check_kind(raw, kind, raw_path)
    apply_calibrations(raw, axes, raw_path)
    source = {"path": str(raw_path.resolve()), "size": source_size(raw_path), "format": raw.format}
    ds = to_dataset(raw, source)
    converted = to_stored_dtype(ds["signal"].data, raw_path)
    if converted.dtype != raw.data.dtype:
        log.info("%s: %s values stored as %s", raw_path, raw.data.dtype, converted.dtype)
        ds["signal"] = ds["signal"].copy(data=converted)
    signal = ds["signal"].data.rechunk(chunks_for(raw.data.shape))
    stats = block_stats(signal)
    nonfinite = negative = 0
    sha = ""

    # the file's hash from the chunks as they are read when the reader knows where the array
    # lies in the file (.npy), else by a thread that reads the file beside the pass
    fused = raw.data_offset is not None and signal.chunks == raw.data.chunks
    also = (stats, file_sha256(raw.data, raw_path, raw.data_offset)) if fused else (stats,)

    started = time.perf_counter()
    keep_freed_chunks()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hashing = None if fused else pool.submit(sha256_of, raw_path)

        def finalize(tmp: Path, results: tuple) -> None:
            nonlocal nonfinite, negative, sha
            counts = results[0]
            nonfinite, negative = int(counts[..., 0].sum()), int(counts[..., 1].sum())
            if nonfinite and not allow_nonfinite:
                where = _first_bad_block(counts[..., 0], signal.chunks)
                raise InputError(f"{raw_path}: {nonfinite} NaN/inf values, first in {where} "
                                 f"({nonfinite_remedy})")
            if negative:
                log.warning("%s: %d negative values (recorded; preprocessing decides)", raw_path, negative)
            sha = results[1] if fused else hashing.result()
            group = zarr.open_group(str(tmp), mode="r+")
            group.attrs["source"] = {**source, "sha256": sha}
            group.attrs["ingest"] = {"nonfinite": nonfinite, "negative": negative,
                                     "allow_nonfinite": allow_nonfinite,
                                     "source_dtype": str(raw.data.dtype),
                                     "axes_given": {a.dim: a.given() for a in axes}}

        try:
            # Local threads even when a distributed client is active: the raw file lives where this
            # runs, and some readers' lazy arrays hold open file handles that cannot be pickled.
            # twice as many threads as cores: a thread waiting on the disk leaves its core to
            # one that encodes
            with dask.config.set(scheduler="threads", num_workers=2 * (os.cpu_count() or 1)):
                write_scan(ds, out_path, policy=policy, overwrite=overwrite, also_compute=also,
                           finalize=finalize, progress=progress)
        except EmscaleError:
            raise
        except Exception as exc:  # a read failing half-way: corrupt or truncated data
            raise InputError(f"{raw_path}: reading failed ({type(exc).__name__}: {exc}); "
                             "no output written") from exc
    seconds = time.perf_counter() - started
    report = IngestReport(
        source=str(raw_path), output=str(out_path), format=raw.format, kind=raw.kind,
        shape=tuple(raw.data.shape), dtype=str(raw.data.dtype), stored_dtype=str(signal.dtype),
        chunks=tuple(chunks_for(raw.data.shape)),
        bytes_read=int(np.prod(raw.data.shape)) * raw.data.dtype.itemsize, seconds=seconds,
        nonfinite=nonfinite, negative=negative, sha256=sha,
    )
    log.info("ingested %s -> %s: %.1f MB/s", raw_path, out_path, report.mb_per_s)
    return report

