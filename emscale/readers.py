"""Lazy readers of raw microscopy files: each returns a ``RawScan`` (a dask array plus calibrations).

Nothing is read here beyond headers: the data stay lazy until ``emscale.ingest`` streams them into
a scan store. Formats:

- anything rosettasciio reads lazily (dm3/dm4, emd (Velox, NCEM), mib, bcf, hspy, zspy, mrc, blo,
  rpl, tif, ...), calibrations from its axes dicts;
- EMD 1.0 ``.h5``/``.emd`` files as written by py4DSTEM/emdfile, read with h5py + dask (py4DSTEM's
  own reader loads the whole file into memory);
- ``.npy``: one positioned read per chunk (per row of it when the chunk is narrower than the
  scan), so neither the graph nor the memory holds the file;
- Zarr: an emscale scan store (re-chunked, ground truth kept) or a bare Zarr array.
"""

from __future__ import annotations

import errno
import importlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dask.array as da
from dask.base import tokenize
import h5py
import numpy as np
import zarr

from emscale.errors import InputError
from emscale.store import NAV_DIMS, SIGNAL_DIMS

log = logging.getLogger(__name__)

# ``chunks_for(shape)`` gives the dask chunks a reader should produce for an array of ``shape``
ChunksFor = Callable[[tuple[int, ...]], tuple]
READ_BYTES = 1 << 30  # at most this much per read call


@dataclass
class RawScan:
    """A lazily read scan: ``data`` has navigation axes first, signal axes last."""

    data: da.Array
    kind: str  # "spectrum" or "diffraction"
    format: str
    coords: dict[str, tuple[np.ndarray, dict[str, Any]]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, tuple[tuple[str, ...], da.Array, dict]] = field(default_factory=dict)
    # ``data`` is a C-ordered array at this byte offset of the file: its hash can be computed
    # from the chunks as they are read (``emscale.ingest``) instead of by a second read
    data_offset: int | None = None

    @property
    def dims(self) -> tuple[str, ...]:
        return NAV_DIMS + SIGNAL_DIMS[self.kind]


def kind_for(n_signal_dims: int, path: Path) -> str:
    if n_signal_dims == 1:
        return "spectrum"
    if n_signal_dims == 2:
        return "diffraction"
    raise InputError(
        f"{path}: {n_signal_dims} signal dimensions; need 1 (spectrum image) or 2 (4D-STEM)"
    )


def check_navigation(n_nav: int, shape: tuple[int, ...], path: Path) -> None:
    if n_nav == 0:
        raise InputError(f"{path}: no navigation dimensions (shape {shape}); a single spectrum or "
                         "pattern is not a scan")
    if n_nav > 2:
        raise InputError(f"{path}: {n_nav} navigation dimensions (shape {shape}); emscale maps 2-D "
                         "scans (y, x)")
    if 0 in shape:
        raise InputError(f"{path}: empty scan (shape {shape})")


def linear_coord(size: int, offset: float, scale: float) -> np.ndarray:
    return offset + scale * np.arange(size, dtype=np.float64)


def _units(value: Any) -> str:
    if value is None or str(value) in ("<undefined>", "", "None"):
        return ""
    return str(value)


# --- rosettasciio ---------------------------------------------------------------------------------

def rosettasciio_plugins(path: Path) -> list[dict]:
    from rsciio import IO_PLUGINS

    ext = path.suffix.lstrip(".").lower()
    return [p for p in IO_PLUGINS if ext in [e.lower() for e in p["file_extensions"]]]


def _infer_navigation(axes: list[dict]) -> None:
    """Readers that mark no axis as navigation (NCEM EMD, ...): 3-D is a spectrum image, 4-D is
    4D-STEM, navigation first."""
    if any(a.get("navigate", False) for a in axes):
        for a in axes:
            a.setdefault("navigate", False)
        return
    n_nav = {3: 2, 4: 2}.get(len(axes), 0)
    for i, a in enumerate(sorted(axes, key=lambda a: a.get("index_in_array", 0))):
        a["navigate"] = i < n_nav


def read_rosettasciio(path: Path, plugin: dict, chunks_for: ChunksFor) -> RawScan:
    try:
        api = importlib.import_module(plugin["api"])
    except ImportError as exc:  # optional reader dependencies (pyUSID, mrcz, ...)
        raise InputError(f"{path}: the {plugin['name']} reader needs a package that is not "
                         f"installed ({exc.name})") from None
    try:
        signals = api.file_reader(str(path), lazy=True)
    except Exception as exc:
        raise InputError(f"{path}: cannot read as {plugin['name']} ({type(exc).__name__}: {exc})") from None
    for s in signals:
        _infer_navigation(s["axes"])
    candidates = [s for s in signals if sum(not a["navigate"] for a in s["axes"]) in (1, 2)
                  and np.ndim(s["data"]) >= 3]
    if not candidates:
        shapes = [tuple(np.shape(s["data"])) for s in signals]
        raise InputError(f"{path}: no spectrum image or 4D-STEM dataset inside (found shapes {shapes})")
    # Files with several datasets (Velox EMD: images plus the spectrum image): take the largest.
    sig = max(candidates, key=lambda s: math.prod(np.shape(s["data"])))
    if len(signals) > 1:
        log.info("%s holds %d datasets; ingesting the largest, shape %s", path, len(signals),
                 tuple(np.shape(sig["data"])))
    axes = sorted(sig["axes"], key=lambda a: a.get("index_in_array", 0))
    data = sig["data"]
    if not isinstance(data, da.Array):
        data = da.from_array(data, chunks="auto")
    if data.ndim != len(axes):  # rosettasciio drops length-1 axes from the axes list
        raise InputError(f"{path}: {data.ndim}-D data but {len(axes)} calibrated axes")
    nav = [i for i, a in enumerate(axes) if a["navigate"]]
    sig_axes = [i for i, a in enumerate(axes) if not a["navigate"]]
    kind = kind_for(len(sig_axes), path)
    if len(nav) == 1:  # a line scan: one row
        data = data[None]
        axes = [{"name": "y", "size": 1, "scale": 1.0, "offset": 0.0, "units": ""}] + axes
        nav = [0] + [i + 1 for i in nav]
        sig_axes = [i + 1 for i in sig_axes]
    check_navigation(len(nav), data.shape, path)
    order = nav + sig_axes
    if order != list(range(data.ndim)):
        data = data.transpose(order)
        axes = [axes[i] for i in order]
    data = data.rechunk(chunks_for(data.shape))
    dims = NAV_DIMS + SIGNAL_DIMS[kind]
    coords = {}
    for dim, axis in zip(dims, axes):
        if axis.get("axis") is not None:  # non-uniform axis
            values = np.asarray(axis["axis"], dtype=np.float64)
        else:
            values = linear_coord(data.shape[dims.index(dim)], float(axis.get("offset", 0.0)),
                                  float(axis.get("scale", 1.0)))
        coords[dim] = (values, {"units": _units(axis.get("units")),
                                "long_name": str(axis.get("name") or dim)})
    md = sig.get("metadata", {}) or {}
    attrs = {"signal_type": str(md.get("Signal", {}).get("signal_type", "") or ""),
             "title": str(md.get("General", {}).get("title", "") or "")}
    return RawScan(data, kind, plugin["name"], coords, attrs)


# --- EMD 1.0 (py4DSTEM / emdfile) with h5py -------------------------------------------------------

class H5Slicer:
    """A pickleable, lazily opened view of one HDF5 dataset for ``dask.array.from_array``.

    Opens the file per read, so it can be shipped to worker processes and never holds the file.
    """

    def __init__(self, path: str, key: str, shape: tuple[int, ...], dtype):
        self.path, self.key, self.shape, self.dtype = path, key, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, index):
        with h5py.File(self.path, "r") as f:
            return f[self.key][index]


def is_emd1(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("emd_group_type", "")) == "file"
    except OSError:
        return False


def read_emd1(path: Path, chunks_for: ChunksFor) -> RawScan:
    """The largest EMD 1.0 array node (py4DSTEM DataCube or a spectrum array) with its dims."""
    arrays = []
    try:
        with h5py.File(path, "r") as f:
            def visit(name, obj):
                if isinstance(obj, h5py.Group) and str(obj.attrs.get("emd_group_type", "")) == "array" \
                        and "data" in obj:
                    arrays.append(name)
            f.visititems(visit)
            if not arrays:
                raise InputError(f"{path}: EMD 1.0 file without an array node")
            name = max(arrays, key=lambda n: math.prod(f[n]["data"].shape))
            node = f[name]
            dset = node["data"]
            shape, dtype = dset.shape, dset.dtype
            dims_meta = []
            for i in range(len(shape)):
                dim = node.get(f"dim{i}")
                dims_meta.append(
                    (np.asarray(dim[()], dtype=np.float64) if dim is not None else None,
                     dict(dim.attrs) if dim is not None else {})
                )
            python_class = str(node.attrs.get("python_class", ""))
            calibration = _emd1_calibration(f, name)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: unreadable EMD/HDF5 file ({type(exc).__name__}: {exc})") from None
    ndim = len(shape)
    if ndim == 4:
        kind = "diffraction"
    elif ndim == 3:
        kind = "spectrum"
    else:
        raise InputError(f"{path}: EMD array {name!r} is {ndim}-D (shape {shape}); need 3-D or 4-D")
    check_navigation(2, shape, path)
    data = da.from_array(H5Slicer(str(path), f"{name}/data", shape, dtype), chunks=chunks_for(shape),
                         name=f"emd1-{os.path.basename(path)}-{name}".replace("/", "-"))
    coords = {}
    for dim, size, (vector, meta) in zip(NAV_DIMS + SIGNAL_DIMS[kind], shape, dims_meta):
        values = np.arange(size, dtype=np.float64)
        if vector is not None and len(vector) == size:
            values = vector
        elif vector is not None and len(vector) >= 2:  # emdfile stores linear dims as [start, step+start]
            values = linear_coord(size, vector[0], vector[1] - vector[0])
        coords[dim] = (values, {"units": _units(_text(meta.get("units"))),
                                "long_name": _text(meta.get("name", dim))})
    attrs = {"emd_node": name, "python_class": python_class, "calibration": calibration}
    return RawScan(data, kind, "EMD 1.0 (py4DSTEM/emdfile)", coords, attrs)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _emd1_calibration(f: h5py.File, array_name: str) -> dict[str, Any]:
    """py4DSTEM's calibration metadata (pixel sizes, units, origin) as plain JSON values."""
    root = array_name.split("/")[0]
    group = f.get(f"{root}/metadatabundle/calibration")
    out: dict[str, Any] = {}
    if group is None:
        return out
    for key, item in group.items():
        if isinstance(item, h5py.Dataset) and item.shape == () and not key.startswith("_"):
            value = item[()]
            value = _text(value) if isinstance(value, bytes) else value
            if isinstance(value, (np.generic,)):
                value = value.item()
            if isinstance(value, (int, float, str, bool)):
                out[key] = value
    return out


# --- npy and Zarr ---------------------------------------------------------------------------------

def _kind_from_ndim(shape: tuple[int, ...], path: Path) -> str:
    if len(shape) == 3:
        return "spectrum"
    if len(shape) == 4:
        return "diffraction"
    raise InputError(f"{path}: {len(shape)}-D array (shape {shape}); need 3-D (y, x, energy) or "
                     "4-D (y, x, ky, kx)")


def read_npy(path: Path, chunks_for: ChunksFor) -> RawScan:
    """A ``.npy`` as one read task per chunk: large positioned reads (``os.preadv``) straight
    into the chunk's array, not page faults on a memory map (cold 4 GB ingest 6.0 -> 5.1 s)."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1
                           else np.lib.format.read_array_header_2_0)  # 2 and 3: same layout
            shape, fortran_order, dtype = read_header(f)
            offset = f.tell()
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from None
    shape = tuple(shape)
    kind = _kind_from_ndim(shape, path)
    check_navigation(2, shape, path)
    if fortran_order and len(shape) > 1:
        raise InputError(f"{path}: Fortran-ordered .npy (every chunk would be spread over the "
                         "whole file); save it C-ordered: np.save(path, np.ascontiguousarray(a))")
    if dtype.hasobject:
        raise InputError(f"{path}: .npy of Python objects ({dtype}); need numbers")
    expected = offset + math.prod(shape) * dtype.itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise InputError(f"{path}: truncated .npy file ({actual} bytes, header promises {expected})")
    data = da.map_blocks(_read_npy_block, str(path), offset, shape, dtype, dtype=dtype,
                         meta=np.empty((0,) * len(shape), dtype),  # else dask reads a chunk here
                         chunks=da.core.normalize_chunks(chunks_for(shape), shape, dtype=dtype),
                         name=f"npy-{tokenize(str(path), actual, path.stat().st_mtime_ns)}")
    return RawScan(data, kind, "npy", data_offset=offset)


def _read_npy_block(path: str, offset: int, shape: tuple, dtype: np.dtype, block_info=None):
    """One chunk of a C-ordered array stored at ``offset`` of ``path``. A chunk of whole rows is
    one contiguous range: read with O_DIRECT into a page-aligned buffer, from the disk straight
    into the array (the page cache's copy cost a cold 4 GB ingest 2 s of its 2 cores: 7.2 ->
    5.3 s); else, or where the file system refuses O_DIRECT, a buffered read per row run."""
    (y0, y1), (x0, x1) = block_info[None]["array-location"][:2]
    pixel = math.prod(shape[2:]) * dtype.itemsize
    out_shape = (y1 - y0, x1 - x0, *shape[2:])
    if x1 - x0 == shape[1]:
        start, n = offset + y0 * shape[1] * pixel, (y1 - y0) * shape[1] * pixel
        if DIRECT_READS and (block := _read_direct(path, start, n)) is not None:
            return block.view(dtype).reshape(out_shape)
        runs = [(start, 0, n)]
    else:
        width = (x1 - x0) * pixel
        runs = [(offset + ((y0 + r) * shape[1] + x0) * pixel, r * width, width)
                for r in range(y1 - y0)]
    out = np.empty(out_shape, dtype)
    buf = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, at, n in runs:
            _read_into(fd, buf[at:at + n], start, path)
    finally:
        os.close(fd)
    return out


DIRECT_READS = hasattr(os, "O_DIRECT")
ALIGN = 4096  # O_DIRECT: offsets, lengths and buffers aligned to the device's block


def _read_direct(path: str, start: int, n: int) -> np.ndarray | None:
    """Bytes ``start:start + n`` of ``path`` read with O_DIRECT (a view into an aligned buffer a
    few KiB larger), or None where the file system does not support it."""
    a0, a1 = start - start % ALIGN, -(-(start + n) // ALIGN) * ALIGN
    raw = np.empty(a1 - a0 + ALIGN, np.uint8)
    shift = -raw.ctypes.data % ALIGN
    aligned = raw[shift:shift + a1 - a0]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    try:
        _read_into(fd, memoryview(aligned), a0, path, at_least=start - a0 + n)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise
    finally:
        os.close(fd)
    return aligned[start - a0:start - a0 + n]


def _read_into(fd: int, buf: memoryview, start: int, path: str, at_least: int | None = None):
    """Fill ``buf`` from byte ``start`` (``preadv`` may return less than asked); the file may
    end early only after ``at_least`` bytes (an aligned read runs past the end of the file)."""
    need, done = len(buf) if at_least is None else at_least, 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:done + READ_BYTES]], start + done)
        if got == 0:
            break
        done += got
    if done < need:
        raise InputError(f"{path}: file ends at byte {start + done}, inside a chunk "
                         "(truncated while being read?)")


def read_zarr(path: Path, chunks_for: ChunksFor) -> RawScan:
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        from emscale.store import not_a_zarr_group

        reason = not_a_zarr_group(path, exc)
        if "v2 store" in reason:  # zarr reads v2 too; it failed for another reason
            reason = f"not a readable Zarr store ({type(exc).__name__}: {exc})"
        raise InputError(f"{path}: {reason}") from None
    if isinstance(node, zarr.Group) and "signal" in node:
        return _read_scan_store(path, chunks_for)
    if isinstance(node, zarr.Group):
        arrays = [a for _, a in node.arrays()]
        if len(arrays) != 1:
            raise InputError(f"{path}: Zarr group with {len(arrays)} arrays and no 'signal'; "
                             "point to the array itself (path/to/store/array)")
        node = arrays[0]
    shape = tuple(node.shape)
    kind = _kind_from_ndim(shape, path)
    check_navigation(2, shape, path)
    data = da.from_zarr(node).rechunk(chunks_for(shape))
    return RawScan(data, kind, f"Zarr v{node.metadata.zarr_format} array")


def _read_scan_store(path: Path, chunks_for: ChunksFor) -> RawScan:
    from emscale.store import open_scan

    ds = open_scan(path)
    sig = ds["signal"]
    data = sig.data.rechunk(chunks_for(sig.shape))
    coords = {d: (np.asarray(ds[d].values), dict(ds[d].attrs)) for d in sig.dims if d in ds.coords}
    attrs = {k: v for k, v in ds.attrs.items() if k not in ("kind", "source")}
    if "source" in ds.attrs:
        attrs["previous_source"] = ds.attrs["source"]
    extra = {}
    for name, var in ds.data_vars.items():
        if name != "signal" and set(var.dims) <= set(sig.dims):
            chunks = chunks_for(sig.shape)[: var.ndim] if var.dims == sig.dims[: var.ndim] else "auto"
            extra[name] = (var.dims, var.data.rechunk(chunks), dict(var.attrs))
    return RawScan(data, ds.attrs["kind"], "emscale scan store", coords, attrs, extra)


# --- dispatch -------------------------------------------------------------------------------------

def open_raw(path: str | os.PathLike, chunks_for: ChunksFor) -> RawScan:
    """Open any supported raw file or store lazily; raise InputError naming the file otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    ext = path.suffix.lower()
    if path.is_dir() or ext == ".zarr":
        if ext == ".zspy":
            return read_rosettasciio(path, rosettasciio_plugins(path)[0], chunks_for)
        return read_zarr(path, chunks_for)
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    if ext == ".npy":
        return read_npy(path, chunks_for)
    if ext in (".h5", ".hdf5", ".emd", ".py4dstem") and is_emd1(path):
        return read_emd1(path, chunks_for)
    plugins = rosettasciio_plugins(path)
    if not plugins:
        raise InputError(f"{path}: unknown format {ext or '(no extension)'!r}; emscale reads .npy, "
                         "Zarr, EMD 1.0/py4DSTEM .h5 and every rosettasciio format")
    errors = []
    for plugin in plugins:  # several plugins share extensions (.h5, .mrc, .img, .xml)
        try:
            return read_rosettasciio(path, plugin, chunks_for)
        except InputError as exc:
            errors.append(str(exc).removeprefix(f"{path}: "))
    raise InputError(f"{path}: {'; '.join(errors)}")
