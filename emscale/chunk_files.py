"""A scan's signal read chunk file by chunk file, straight into numpy blocks.

Reading a chunk through Zarr costs about twice the Blosc decode itself (a 32 MiB uint16 EELS
chunk: 30 ms against 14 ms): zarr hops onto its event loop and a thread, decodes into a new
buffer and copies that into the output. Every pass of every stage reads the scan, so
``direct_array`` builds the dask array of a Zarr v3 array whose chunks are plain files of the
codecs emscale writes (bytes, optionally Blosc, optionally a CRC-32C of the stored bytes): one
task per chunk that reads the file, checks its checksum and decodes it into the block it
returns. Anything else (sharding, other codecs, big-endian bytes)
keeps Zarr's own reads.

A chunk file that is missing is an error naming it, not the fill value Zarr would give, where
the store holds every chunk (emscale's scan stores say so: ``store.EVERY_CHUNK``): a missing
one was lost, and reading it as zeros would make a phase of it. A chunk whose checksum does not
match (changed or damaged in place: LZ4 itself would decode it to wrong numbers) or that does
not decode to its size is an error naming the file too.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import Counter
from pathlib import Path

import dask.array as da
import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr
from dask.array.core import normalize_chunks
from dask.base import tokenize
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.chunk_grids import RegularChunkGrid

from emscale.errors import StoreError

# stored bytes read from each array's chunk files by this process (a worker): what a benchmark
# prices at the read+decode floor of that array (``emscale bench scale``: the scan's passes
# apart from the stored results a stage reads back)
BYTES_READ: Counter[str] = Counter()
_COUNTING = threading.Lock()


def direct_array(store: str | os.PathLike, name: str, like: da.Array, *,
                 missing_is_fill: bool = False,
                 remedy: str = "ingest the scan again") -> da.Array | None:
    """The dask array of ``store/name`` read by ``read_chunk``, with ``like``'s chunks: the
    stored ones, or blocks of several whole stored chunks (a stage group's maps, read in
    bigger blocks: one task reads each of its chunk files into its block), or None when the
    array's layout needs Zarr's own reads. ``missing_is_fill``: a missing chunk reads as the
    fill value (a store that may leave such chunks out), else it is an error; ``remedy``: what
    the errors of a missing or damaged chunk tell the user to do."""
    path = Path(store) / name
    z = zarr.open_array(str(path), mode="r", zarr_format=3)
    meta, dtype = z.metadata, np.dtype(z.dtype)
    codecs = tuple(meta.codecs)
    if not _plain(codecs, dtype) or not isinstance(meta.chunk_grid, RegularChunkGrid):
        return None
    chunk_shape = tuple(int(c) for c in meta.chunk_grid.chunk_shape)
    shape = tuple(int(n) for n in z.shape)
    chunks = tuple(like.chunks)
    if len(chunks) != len(shape) or not all(
            all(b % c == 0 for b in dim[:-1]) for dim, c in zip(chunks, chunk_shape)):
        return None  # a block that would cut a stored chunk
    encoding = meta.chunk_key_encoding
    fill = meta.fill_value if missing_is_fill else None
    checked = isinstance(codecs[-1], Crc32cCodec)
    options = dict(array=str(path), encoding=encoding, chunk_shape=chunk_shape, shape=shape,
                   stored=dtype.str, fill=fill, checked=checked, remedy=remedy,
                   compressed=any(isinstance(c, BloscCodec) for c in codecs))
    token = tokenize(like.name, str(path), encoding, chunks)
    if chunks == normalize_chunks(chunk_shape, shape):
        return da.map_blocks(read_chunk, **options, chunks=chunks, dtype=dtype,
                             meta=np.empty((0,) * like.ndim, dtype), name=f"read-{name}-{token}")
    starts = [np.cumsum((0, *dim[:-1])) // c for dim, c in zip(chunks, chunk_shape)]
    return da.map_blocks(read_chunks, **options, first=starts, chunks=chunks, dtype=dtype,
                         meta=np.empty((0,) * like.ndim, dtype), name=f"read-{name}-{token}")


def read_chunks(*, first, block_info=None, **options) -> np.ndarray:
    """A block of several whole stored chunks (``first``: the index of each block's first chunk
    along each dimension): each chunk's file read by ``read_chunk`` into its place."""
    info = block_info[None]
    block_id, block = info["chunk-location"], info["chunk-shape"]
    chunk_shape = options["chunk_shape"]
    out = np.empty(block, np.dtype(options["stored"]))
    counts = [math.ceil(n / c) for n, c in zip(block, chunk_shape)]
    shape = options["shape"]
    for offset in np.ndindex(*counts):
        index = tuple(int(f[b]) + o for f, b, o in zip(first, block_id, offset))
        edge = _edge(chunk_shape, shape, index)
        place = out[tuple(slice(o * c, o * c + n) for o, c, n in zip(offset, chunk_shape, edge))]
        if edge == tuple(chunk_shape) and place.flags.c_contiguous:
            read_chunk(**options, block_id=index, into=place)  # decoded in place: no copy
        else:
            place[...] = read_chunk(**options, block_id=index)
    return out


def _plain(codecs: tuple, dtype: np.dtype) -> bool:
    """Bytes in this machine's order (little-endian), then at most a Blosc codec, then at most
    a CRC-32C."""
    if codecs and isinstance(codecs[-1], Crc32cCodec):
        codecs = codecs[:-1]
    if not codecs or len(codecs) > 2 or not isinstance(codecs[0], BytesCodec) \
            or not all(isinstance(c, BloscCodec) for c in codecs[1:]):
        return False
    endian = codecs[0].endian
    return dtype.itemsize == 1 or (np.little_endian and (endian is None
                                                         or endian.value == "little"))


def verified(raw: bytes, file: str) -> np.ndarray:
    """The stored bytes of a chunk that ends in its CRC-32C (little-endian), checked (a view:
    no copy)."""
    body = np.frombuffer(raw, np.uint8)[:-4]
    if len(raw) < 4 or google_crc32c.value(body) != int.from_bytes(raw[-4:], "little"):
        raise ValueError("its checksum does not match: changed or damaged since it was written")
    return body


def damaged_chunk(group: Path) -> Path | None:
    """The first chunk file of a Zarr group's arrays (a scan store, a stage group) whose
    CRC-32C does not match (a pass over the group's stored bytes, at ~14 GB/s: only on the
    error path), or None."""
    for meta in sorted(group.glob("*/zarr.json")):
        info = json.loads(meta.read_text())
        if not any(c.get("name") == "crc32c" for c in info.get("codecs", [])):
            continue
        for root, _dirs, files in os.walk(meta.parent / "c"):
            for name in files:
                path = Path(root) / name
                try:
                    verified(path.read_bytes(), str(path))
                except ValueError:
                    return path
    return None


def read_chunk(*, array: str, encoding, chunk_shape: tuple[int, ...], shape: tuple[int, ...],
               stored: str, compressed: bool, fill, block_id: tuple[int, ...],
               checked: bool = False, remedy: str = "ingest the scan again",
               into: np.ndarray | None = None) -> np.ndarray:
    """One chunk of the Zarr array at ``array``: its file read whole and decoded into the
    block returned (cut to the block's shape at the array's far edges), or into ``into`` (a
    C-contiguous array of the whole chunk's shape: a block's part)."""
    file = os.path.join(array, encoding.encode_chunk_key(block_id))
    dtype = np.dtype(stored)
    try:
        with open(file, "rb") as f:
            raw = f.read()
        with _COUNTING:
            BYTES_READ[array] += len(raw)
    except FileNotFoundError:
        if fill is not None:
            return np.full(_edge(chunk_shape, shape, block_id), fill, dtype)
        raise StoreError(f"{file}: chunk {block_id} ({_pixels(chunk_shape, shape, block_id)}) is "
                         "missing (emscale's stores hold every chunk: this one was lost); "
                         f"{remedy}") from None
    out = np.empty(chunk_shape, dtype) if into is None else into
    if checked:
        try:
            raw = verified(raw, file)
        except ValueError as exc:
            raise StoreError(f"{file}: chunk {block_id} ({_pixels(chunk_shape, shape, block_id)})"
                             f": {exc}; the store is damaged: {remedy}") from None
    if compressed:
        try:
            # Blosc's header: the sizes decoded (bytes 4-8) and stored (12-16), little-endian
            nbytes, cbytes = (int.from_bytes(bytes(raw[i:i + 4]), "little") for i in (4, 12))
            if len(raw) < 16 or cbytes != len(raw):
                raise ValueError(f"{len(raw)} bytes on disk, its header says {cbytes}")
            if nbytes != out.nbytes:
                raise ValueError(f"it decodes to {nbytes} bytes, the chunk is {out.nbytes}")
            numcodecs.blosc.decompress(raw, out)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise StoreError(f"{file}: chunk {block_id} ({_pixels(chunk_shape, shape, block_id)})"
                             f" cannot be decoded ({exc}); the store is damaged: {remedy}") \
                from None
    else:
        if len(raw) != out.nbytes:
            raise StoreError(f"{file}: chunk {block_id} ({_pixels(chunk_shape, shape, block_id)})"
                             f" holds {len(raw)} bytes, expected {out.nbytes}; the store is "
                             f"damaged: {remedy}")
        out = np.frombuffer(raw, dtype).reshape(chunk_shape)
        if into is not None:
            into[...] = out
            out = into
    edge = _edge(chunk_shape, shape, block_id)
    return out if edge == chunk_shape else out[tuple(slice(0, e) for e in edge)]


def first_missing(array: str | os.PathLike) -> tuple[Path, tuple[int, ...], str] | None:
    """The first chunk file missing from a Zarr v3 array of regular chunks written whole
    (file, chunk index, pixels it holds), or None: one walk of its chunk directory counted
    against the grid (about 1 600 files for a 100 GB scan of 64 MiB chunks), the files looked
    up one by one only when the count is short."""
    path = Path(array)
    info = json.loads((path / "zarr.json").read_text())
    if info.get("node_type") != "array" or not info.get("shape"):
        return None
    shape = tuple(info["shape"])
    chunk_shape = tuple(info["chunk_grid"]["configuration"]["chunk_shape"])
    counts = [math.ceil(n / c) for n, c in zip(shape, chunk_shape)]
    found = sum(len(files) for _, _, files in os.walk(path / "c"))
    if found >= math.prod(counts):
        return None
    encoding = zarr.open_array(str(path), mode="r", zarr_format=3).metadata.chunk_key_encoding
    for index in np.ndindex(*counts):
        file = path / encoding.encode_chunk_key(index)
        if not file.exists():
            pixels = _pixels(chunk_shape, shape, index) if len(shape) >= 2 else ""
            return file, index, pixels
    return None


def _pixels(chunk_shape, shape, block_id) -> str:
    """The navigation pixels a chunk holds, for an error message."""
    y0, x0 = (i * c for i, c in zip(block_id[:2], chunk_shape[:2]))
    ny, nx = _edge(chunk_shape, shape, block_id)[:2]
    return f"pixels y {y0}:{y0 + ny}, x {x0}:{x0 + nx}"


def _edge(chunk_shape, shape, block_id) -> tuple[int, ...]:
    """The block's shape: the chunk's, cut at the array's far edges."""
    return tuple(min(c, n - i * c) for c, n, i in zip(chunk_shape, shape, block_id))
