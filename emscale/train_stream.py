"""The training data: a ``preprocess`` stage's pixels streamed chunk by chunk from Zarr.

``gather_training_set`` first copies the pixels training can use into a small store of their
own, once (one pass over the scan on the cluster; the preprocessing chain runs on those pixels
alone): every pixel of a small scan, a regular grid of about ``max_train_pixels`` on a large one.
Epochs then read that store, so training costs the same on a 1 GB and on a 100 GB scan.

``ChunkStream`` reads the features with zarr (no dask: training runs in one process), holding at
most ``buffer_chunks`` navigation chunks: the chunks' order is shuffled every epoch and the pixels
of each group of chunks are shuffled together (a shuffle buffer), so memory depends on chunk size,
never on scan size. Invalid pixels are skipped. Train and validation pixels are separated by
spatial tiles (``tile`` x ``tile`` pixels, a seeded ``val_fraction`` of the tiles), never pixel by
pixel: neighbouring pixels are nearly the same spectrum and would leak. ``max_train_pixels`` keeps
a regular grid of training pixels (spatially uniform) on huge scans.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import zarr

from emscale.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from emscale.stages.train import TrainConfig


def cuda_in_use(config: "TrainConfig") -> bool:
    """Whether training will run on a GPU. On a CPU the steps use every core, and a background
    reader only slows them down (measured: 73-76 % of the in-memory rate with it, 76-81 %
    without); a GPU leaves the CPU free to read."""
    if config.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def _blosc_threads(use: bool):
    """Blosc's own decode threads: on for reads in the training thread (the steps wait anyway:
    30 ms per 64 MiB chunk against 48 without), off for a background reader, where they fight
    PyTorch's threads (0.90 s against 0.32 s for two chunks on 2 cores)."""
    import numcodecs.blosc

    old = numcodecs.blosc.use_threads
    numcodecs.blosc.use_threads = use
    try:
        yield
    finally:
        numcodecs.blosc.use_threads = old


def _uniform_hash(v: np.ndarray, seed: int) -> np.ndarray:
    """Uniform numbers in [0, 1) from integers and a seed (splitmix64's finaliser, top 53 bits)."""
    with np.errstate(over="ignore"):
        v = v + np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
        v = (v ^ (v >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        v = (v ^ (v >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        v = v ^ (v >> np.uint64(31))
    return (v >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_tiles(tile: int, nav_shape: tuple[int, int], region=None) -> list[int]:
    """The ids of the tiles that hold training candidates: all of the scan's, or those that meet
    the declared normal ``region`` (y0, y1, x0, x1)."""
    ny, nx = nav_shape
    t = tile
    ry0, ry1, rx0, rx1 = region or (0, ny, 0, nx)
    return [ty * (nx // t + 1) + tx for ty in range(math.ceil(ny / t))
            for tx in range(math.ceil(nx / t))
            if ty * t < ry1 and (ty + 1) * t > ry0 and tx * t < rx1 and (tx + 1) * t > rx0]


def check_split(tile: int, nav_shape: tuple[int, int], region=None) -> None:
    """Refuse a split that cannot work on a scan of ``nav_shape`` pixels (before any training):
    training and validation need a tile each, inside the declared normal ``region`` if any."""
    ny, nx = nav_shape
    t = tile
    if region is not None and (region[1] > ny or region[3] > nx):
        raise ConfigError(f"normal_region: {list(region)} reaches outside the {ny} x {nx} scan "
                          "(y0, y1, x0, x1 with y1 <= ny and x1 <= nx)")
    if len(split_tiles(tile, nav_shape, region)) < 2:
        if region is None:
            raise ConfigError(f"train.tile: {t} leaves the {ny} x {nx} scan a single tile; "
                              "training and validation need two at least (lower train.tile)")
        raise ConfigError(f"normal_region: {list(region)} meets a single train.tile tile of {t} "
                          "pixels; training and validation need two at least (lower train.tile "
                          "or declare a larger region)")


def sample_stride(nav_shape: tuple[int, int], config: "TrainConfig", region=None) -> int:
    """Every how many pixels along y and x training samples: the grid that keeps about
    ``max_train_pixels`` training pixels (of the normal ``region`` when declared)."""
    if not config.max_train_pixels:
        return 1
    ny, nx = nav_shape
    if region is not None:
        ny, nx = region[1] - region[0], region[3] - region[2]
    n_train = ny * nx * (1 - config.val_fraction)
    return max(1, math.ceil(math.sqrt(n_train / config.max_train_pixels)))


def wants_clean(config: "TrainConfig") -> bool:
    """Whether training reads the clean target (a denoising objective that may use it)."""
    return config.objective == "denoise" and config.noise in ("auto", "clean")


def gather_training_set(stage, config: "TrainConfig", path: str | os.PathLike, *,
                        normal_region=None, progress: bool = False) -> Path:
    """The pixels training can use, from a ``preprocess`` stage (``features_of`` it: its stored
    features, or the chain rerun on the scan) into a store at ``path`` (kept: a store already
    there is reused). Every ``sample_stride``-th pixel along y and x of the normal region (the
    whole scan without one): a grid of about ``max_train_pixels`` training pixels plus the
    validation tiles' share. The store looks like a preprocess stage (``features``, ``valid``,
    ``clean_features`` if training uses it) with the grid in attrs ``sample_origin`` and
    ``sample_stride``, so ``ChunkStream`` splits it by the scan's tiles.
    Its size: about ``max_train_pixels / (1 - val_fraction)`` pixels of float32 features."""
    from emscale.atomic import PARTIAL_MARK, atomic_directory
    from emscale.progress import compute
    from emscale.stages.preprocess import features_of
    from emscale.store import (MIB, WRITE_EMPTY_CHUNKS, ChunkPolicy, default_compressors,
                               navigation_chunks)

    path = Path(path)
    if (path / "zarr.json").exists():
        return path
    ny, nx = stage.sizes["y"], stage.sizes["x"]
    region = tuple(int(v) for v in normal_region) if normal_region is not None else None
    stride = sample_stride((ny, nx), config, region)
    chunk_pixels = int(np.prod([c[0] for c in stage["valid"].chunks])) if stage["valid"].chunks \
        else stage["valid"].size
    # the grid of the whole scan (lazy: blocks outside the region are never computed), then the
    # grid pixels inside the normal region
    grid = features_of(stage, stride)
    origin = [0, 0]
    if region is not None:
        check_split(config.tile, (ny, nx), region)
        iy0, iy1, ix0, ix1 = (-(-v // stride) for v in region)  # first grid index at or after
        grid = grid.isel(y=slice(iy0, iy1), x=slice(ix0, ix1))
        origin = [iy0 * stride, ix0 * stride]
    names = ["features", "valid"] + (["clean_features"] if wants_clean(config)
                                     and "clean_features" in grid else [])
    grid = grid[names]
    signal_shape = grid["features"].shape[2:]
    # chunks of about the scan's chunk in pixels: the stream's buffers stay the same size
    feature_mib = chunk_pixels * int(np.prod(signal_shape)) * 4 / MIB
    cy, cx = navigation_chunks(grid["valid"].shape, signal_shape,
                               ChunkPolicy.of(max(1.0, feature_mib)))
    grid = grid.chunk({"y": cy, "x": cx})
    for v in grid.variables.values():
        v.encoding = {}
    grid.attrs = {"sample_stride": stride, "sample_origin": origin, "scan_shape": [ny, nx],
                  "preprocess": stage.attrs.get("preprocess"), "source": stage.attrs.get("source")}
    encoding = {n: {"compressors": default_compressors(np.dtype(grid[n].dtype).itemsize)}
                for n in names}
    path.parent.mkdir(parents=True, exist_ok=True)
    # what an interrupted write left (its workers may still have been writing when the error
    # removed it); the run's output lock says no one else writes here
    for stale in path.parent.glob(f"{path.name}{PARTIAL_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_directory(path, overwrite=True) as tmp:
        delayed = grid.to_zarr(str(tmp), mode="w-", zarr_format=3, consolidated=False,
                               encoding=encoding, compute=False,
                               write_empty_chunks=WRITE_EMPTY_CHUNKS)
        compute(delayed, description="training set", enabled=progress)
    return path


EXACT_PCA_FEATURES = 4096  # an eigendecomposition of the scatter matrix up to here (0.3 s)

class ChunkStream:
    """Training and validation pixels of a ``preprocess`` stage, streamed chunk by chunk; the
    split and the shuffles are drawn from ``seed``; only pixels inside ``normal_region`` (y0, y1,
    x0, x1) train and validate when one is given."""

    def __init__(self, stage_path: str | os.PathLike, config: TrainConfig, *, seed: int = 0,
                 normal_region: tuple[int, int, int, int] | None = None):
        path = Path(stage_path)
        if not (path / "zarr.json").exists() or not (path / "features" / "zarr.json").exists():
            raise StoreError(f"{path}: no preprocess stage with features (run preprocessing first)")
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        self.features = group["features"]
        self.valid = group["valid"] if "valid" in group else None
        # the clean target is read only when the objective uses it
        self.clean = group["clean_features"] if wants_clean(config) and "clean_features" in group \
            else None
        self.config = config
        self.seed = seed
        self.region = tuple(normal_region) if normal_region is not None else None
        self.prefetch = bool(config.prefetch) if config.prefetch is not None else cuda_in_use(config)
        # a gathered training set: pixel (i, j) is the scan's (origin + stride * (i, j))
        self.origin = tuple(group.attrs.get("sample_origin", (0, 0)))
        self.step = int(group.attrs.get("sample_stride", 1))
        gathered = "sample_stride" in group.attrs
        ny, nx = self.features.shape[:2]
        scan_shape = tuple(group.attrs.get("scan_shape", (ny, nx)))
        self.signal_shape = tuple(self.features.shape[2:])
        self.n_features = int(np.prod(self.signal_shape))
        cy, cx = self.features.chunks[:2]
        self.chunks = [(y0, min(y0 + cy, ny), x0, min(x0 + cx, nx))
                       for y0 in range(0, ny, cy) for x0 in range(0, nx, cx)]
        self.nav_shape = (ny, nx)
        self.scan_shape = scan_shape
        self.path = path
        self._selections: dict = {}
        self._resident: dict = {}
        self._kept: dict = {}
        self._validation = None
        # tiles are validation below a hash threshold, drawn over the candidate tiles (those of
        # a declared region, which must get validation tiles of its own); at least one tile
        # goes to each part
        check_split(config.tile, scan_shape, self.region)
        t = config.tile
        n_tiles = (scan_shape[0] // t + 1) * (scan_shape[1] // t + 1)
        u_all = _uniform_hash(np.arange(n_tiles, dtype=np.uint64), seed)
        u_real = np.sort(u_all[split_tiles(t, scan_shape, self.region)])
        n_val = int(np.clip((u_real < config.val_fraction).sum(), 1, len(u_real) - 1))
        self._val_threshold = u_real[n_val - 1]
        # the sample grid, unless the set was gathered on one already
        self.stride = 1 if gathered else sample_stride(scan_shape, config, self.region)

    def signature(self) -> str:
        """The training data's identity for checkpoints: shape, chunks and the stage's attrs."""
        attrs = zarr.open_group(str(self.path), mode="r", zarr_format=3).attrs
        return json.dumps([list(self.features.shape), list(self.features.chunks),
                           attrs.get("preprocess"), attrs.get("source")], sort_keys=True, default=str)

    def split(self, y0, y1, x0, x1) -> np.ndarray:
        """0 = train, 1 = validation, by seeded spatial tiles; 2 = left out (by the sample grid, or
        outside ``normal_region``)."""
        t = self.config.tile
        yy, xx = np.mgrid[y0:y1, x0:x1]
        yy, xx = self.origin[0] + self.step * yy, self.origin[1] + self.step * xx  # the scan's
        tile_id = (yy // t) * (self.scan_shape[1] // t + 1) + xx // t
        # a fixed hash of (seed, tile): the same tiles are validation in every epoch and run
        u = _uniform_hash(tile_id.astype(np.uint64), self.seed)
        out = (u <= self._val_threshold).astype(np.int8)
        region = self.region
        if region is not None:  # outside the declared normal region: neither train nor validation
            ry0, ry1, rx0, rx1 = region
            out[~((yy >= ry0) & (yy < ry1) & (xx >= rx0) & (xx < rx1))] = 2
        if self.stride > 1:
            grid = (yy % self.stride == 0) & (xx % self.stride == 0)
            out[(out == 0) & ~grid] = 2
        return out.ravel()

    def selection(self, chunk, part: int) -> np.ndarray:
        """Pixels of ``chunk`` in ``part`` that are valid (cached: a bool per pixel)."""
        key = (chunk, part)
        if key not in self._selections:
            y0, y1, x0, x1 = chunk
            sel = self.split(y0, y1, x0, x1) == part
            if self.valid is not None:
                sel &= np.asarray(self.valid[y0:y1, x0:x1]).ravel().astype(bool)
            self._selections[key] = sel
        return self._selections[key]

    def read(self, chunk, part: int) -> tuple[np.ndarray, np.ndarray | None]:
        y0, y1, x0, x1 = chunk
        sel = self.selection(chunk, part)
        x = np.asarray(self.features[y0:y1, x0:x1], np.float32).reshape(-1, self.n_features)[sel]
        clean = None
        if self.clean is not None:
            clean = np.asarray(self.clean[y0:y1, x0:x1], np.float32).reshape(-1, self.n_features)[sel]
        return x, clean

    def _read_into(self, array, chunk, sel, scratch, out) -> None:
        """The selected pixels of one chunk into ``out``, through a reused ``scratch`` chunk buffer:
        zarr decodes into memory already touched, so no 64 MiB chunk is freshly page-faulted
        (45 ms a chunk against 50-110 ms)."""
        from zarr.core.buffer import default_buffer_prototype

        y0, y1, x0, x1 = chunk
        n = (y1 - y0) * (x1 - x0)
        view = scratch[:n].reshape(y1 - y0, x1 - x0, *self.signal_shape)
        array.get_basic_selection((slice(y0, y1), slice(x0, x1)),
                                  out=default_buffer_prototype().nd_buffer.from_numpy_array(view))
        np.compress(sel, scratch[:n], axis=0, out=out)

    def _group_buffers(self, head: int) -> dict:
        """Reused buffers for one group: ``head`` free rows in front (for the carried partial
        batch), then room for ``buffer_chunks`` chunks; a scratch chunk; the same for ``clean``."""
        cy, cx = self.features.chunks[:2]
        rows = head + self.config.buffer_chunks * cy * cx
        shape = lambda n: (n, self.n_features)  # noqa: E731
        return {"x": np.empty(shape(rows), np.float32), "scratch": np.empty(shape(cy * cx), np.float32),
                "c": None if self.clean is None else np.empty(shape(rows), np.float32),
                "head": head}

    def _held(self, part: int) -> dict | None:
        """``part``'s selected pixels per chunk, read and decoded once and kept, when they (and
        their clean targets) take at most ``resident_mib``; else None (read every epoch). A
        re-read and decode of the gathered set each epoch held the steps up: 2.1 s an epoch of
        the EELS MLP on 2 cores against 3.0-3.6, and a GPU trained it no faster than 8 CPU
        threads."""
        if part not in self._kept:
            counts = [int(self.selection(c, part).sum()) for c in self.chunks]
            per_pixel = self.n_features * 4 * (1 if self.clean is None else 2)
            self._kept[part] = None
            if sum(counts) * per_pixel <= self.config.resident_mib * 2**20:
                cy, cx = self.features.chunks[:2]
                rows = lambda m: np.empty((m, self.n_features), np.float32)  # noqa: E731
                whole = {"x": rows(sum(counts)), "c": None if self.clean is None
                         else rows(sum(counts)), "scratch": rows(cy * cx), "head": 0}
                with _blosc_threads(not self.prefetch):
                    self._read_group(self.chunks, part, whole)
                starts = np.concatenate([[0], np.cumsum(counts)])
                self._kept[part] = {
                    c: (whole["x"][a:b], None if whole["c"] is None else whole["c"][a:b])
                    for c, a, b in zip(self.chunks, starts[:-1], starts[1:])}
        return self._kept[part]

    def _read_group(self, chunks, part, buffers, held: dict | None = None):
        """The group's selected pixels, read into ``buffers`` behind its head room: (x, clean, n);
        copied from ``held`` (``_held``'s kept rows) when given."""
        off = buffers["head"]
        for chunk in chunks:
            if held is not None:
                x, c = held[chunk]
                n = len(x)
                buffers["x"][off:off + n] = x
                if c is not None:
                    buffers["c"][off:off + n] = c
                off += n
                continue
            sel = self.selection(chunk, part)
            n = int(sel.sum())
            self._read_into(self.features, chunk, sel, buffers["scratch"], buffers["x"][off:off + n])
            if self.clean is not None:
                self._read_into(self.clean, chunk, sel, buffers["scratch"], buffers["c"][off:off + n])
            off += n
        return buffers, off

    def batches(self, part: int, epoch: int | None, batch_size: int) -> Iterator[tuple[Any, Any]]:
        """Minibatches (CPU tensors) of ``part`` (0 train, 1 validation). With ``epoch`` the chunk order and the
        pixels within each group of ``buffer_chunks`` chunks are shuffled by (seed, epoch). Groups
        are read into two reused buffers (no fresh allocation per chunk); with ``prefetch`` a
        background thread fills one while the other is consumed. The last partial batch of a
        shuffled group is carried into the head room in front of the next one (less than one
        batch), so memory stays bounded: two groups and a scratch chunk."""
        from concurrent.futures import ThreadPoolExecutor

        order = np.arange(len(self.chunks))
        rng = None
        if epoch is not None:
            rng = np.random.default_rng([self.seed, epoch])
            rng.shuffle(order)
        size = self.config.buffer_chunks
        groups = [[self.chunks[i] for i in order[g:g + size]] for g in range(0, len(order), size)]
        if len(groups) == 1:  # the whole part fits in the buffer: read it once, in chunk order
            if part not in self._resident:
                buffers, end = self._read_group(sorted(groups[0]), part, self._group_buffers(0))
                self._resident[part] = (buffers["x"][:end], None if self.clean is None
                                        else buffers["c"][:end])
            yield from self._yield_group(*self._resident[part], rng, batch_size, last=True)
            return
        held = self._held(part)
        # kept rows are only copied in: no read to overlap, so one buffer and no reader thread
        prefetch = self.prefetch and held is None
        pair = [self._group_buffers(batch_size) for _ in range(1 if held is not None else 2)]
        carry_x = carry_c = None
        with _blosc_threads(not prefetch), ThreadPoolExecutor(1) as pool:
            read = (lambda gi: pool.submit(self._read_group, groups[gi], part, pair[gi % 2],
                                           held)) if prefetch else None
            pending = read(0) if prefetch else None
            for gi in range(len(groups)):
                if prefetch:
                    buffers, end = pending.result()
                    if gi + 1 < len(groups):
                        pending = read(gi + 1)
                else:
                    buffers, end = self._read_group(groups[gi], part, pair[gi % len(pair)],
                                                    held)
                start = buffers["head"]
                if carry_x is not None:  # the carried rows go just in front of the group
                    start -= len(carry_x)
                    buffers["x"][start:start + len(carry_x)] = carry_x
                    if carry_c is not None:
                        buffers["c"][start:start + len(carry_c)] = carry_c
                x = buffers["x"][start:end]
                c = None if self.clean is None else buffers["c"][start:end]
                # an ordered pass just yields its last partial batch
                last = gi + 1 == len(groups) or rng is None
                carry_x, carry_c = yield from self._yield_group(x, c, rng, batch_size, last)

    @staticmethod
    def _yield_group(x, c, rng, batch_size, last):
        """Yield ``x``'s batches (shuffled when ``rng``); return the copied rest unless ``last``."""
        import torch

        idx = rng.permutation(len(x)) if rng is not None else np.arange(len(x))
        stop = len(x) if last else len(x) // batch_size * batch_size
        # gathers by torch (multithreaded, GIL released), not numpy fancy indexing; the gathered
        # batch is a copy, so the buffer may be refilled once it is consumed
        xt, ct = torch.from_numpy(x), None if c is None else torch.from_numpy(c)
        it = torch.from_numpy(idx)
        for s in range(0, stop, batch_size):
            b = it[s:s + batch_size]
            yield xt[b], None if ct is None else ct[b]
        rest = idx[stop:]
        if not len(rest):
            return None, None
        return x[rest], None if c is None else c[rest]

    def validation_set(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The validation pixels, read once and kept: at most ``max_val_pixels`` of them (evenly
        spaced over the scan, picked chunk by chunk), so memory stays bounded and no epoch
        re-reads the scan to validate."""
        if self._validation is None:
            counts = np.array([int(self.selection(c, 1).sum()) for c in self.chunks])
            total = int(counts.sum())
            if total == 0:
                raise ConfigError("train.val_fraction: no validation pixel (the scan is smaller "
                                  "than a few train.tile tiles; lower train.tile)")
            keep = np.linspace(0, total - 1, min(total, self.config.max_val_pixels)).astype(np.int64)
            starts = np.concatenate([[0], np.cumsum(counts)])
            xs, cs = [], []
            for i, chunk in enumerate(self.chunks):
                local = keep[(keep >= starts[i]) & (keep < starts[i + 1])] - starts[i]
                if len(local):
                    x, c = self.read(chunk, 1)
                    xs.append(x[local])
                    cs.append(None if c is None else c[local])
            self._validation = (np.concatenate(xs),
                                None if self.clean is None else np.concatenate(cs))
        return self._validation

    def principal_components(self, k: int, mean: np.ndarray, scale: float, seed: int,
                             max_bytes: int = 256 << 20) -> np.ndarray:
        """The ``k`` leading principal axes (k, features; orthonormal rows) of the standardised
        training pixels (at most ``max_bytes`` of them, an even subsample when there are more):
        exact up to ``EXACT_PCA_FEATURES`` features, else a randomized SVD (12 power iterations;
        a close eigenvalue pair may then come out mixed, which only moves the start)."""
        from sklearn.utils.extmath import randomized_svd

        rows = max(4 * k, max_bytes // (4 * self.n_features))
        # (the stream's pixels are at most its navigation grid: every stride-th keeps the sample
        # under max_bytes without holding more first)
        stride = max(1, -(-int(np.prod(self.nav_shape)) // rows))
        x = np.concatenate([x.numpy()[::stride].copy()  # (the batches are reused buffers)
                            for x, _ in self.batches(0, None, 1 << 16)])
        x = (x - mean) / np.float32(scale)
        if self.n_features <= EXACT_PCA_FEATURES:  # the scatter matrix and its eigenvectors
            _, vectors = np.linalg.eigh((x.T @ x).astype(np.float64))
            return np.ascontiguousarray(vectors[:, ::-1][:, :k].T, np.float32)
        _, _, vt = randomized_svd(x, k, n_oversamples=max(10, k), n_iter=12, random_state=seed)
        return vt.astype(np.float32)

    def moments(self) -> tuple[np.ndarray, float]:
        """Per-feature mean and one overall standard deviation of the training pixels (one pass,
        float64 sums)."""
        n, s, ss = 0, np.zeros(self.n_features), 0.0
        for x, _ in self.batches(0, None, 1 << 16):
            x = x.numpy()
            n += len(x)
            s += x.sum(axis=0, dtype=np.float64)
            ss += float(np.einsum("ij,ij->", x, x, dtype=np.float64))
        if n < 2:
            raise ConfigError(f"train: only {n} valid training pixel(s); lower "
                              "train.val_fraction or give a larger scan")
        mean = s / n
        var = max(ss / n - float(mean @ mean), 0.0) / self.n_features
        return mean.astype(np.float32), max(math.sqrt(var), 1e-12)

