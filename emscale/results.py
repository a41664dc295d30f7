"""The results store (DESIGN.md section 3): one Zarr v3 store per scan, one group per stage.

Each stage group is written as a complete Zarr v3 store under a temporary name inside the results
directory (``NAME.partial-XXXX``) and renamed into place when complete, so a crash never leaves a
half-written stage that looks complete: a stage group exists only once all its chunks and
attributes are on disk. Stage groups are read back with xarray (``open_stage``).

Chunk-level resume: each write task stores one chunk and then leaves an empty marker file for it
(``.emscale-done/VAR/I.J.K`` in the temporary group). Given a resume key (the runner passes the
stage's cache key), the temporary group is named after it (``NAME.partial-resume-KEY``) and kept
when the write fails or the process is killed; the next write with the same key and layout
computes only the chunks without a marker. A different key starts afresh.
"""

from __future__ import annotations

import contextlib
import json
import math
import logging
import operator
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize

from emscale.atomic import PARTIAL_MARK, atomic_directory
from emscale.config import utc_now
from emscale.errors import StoreError
from emscale.progress import compute, repeating
from emscale.reduction import WINDOW_BLOCKS, fused_into_leaves
from emscale.store import (EVERY_CHUNK, SIGNAL_DIMS, WRITE_EMPTY_CHUNKS, consolidate,
                           coordinate_encoding, default_compressors, open_target)

log = logging.getLogger(__name__)

RESUME_MARK = f"{PARTIAL_MARK}resume-"
PROGRESS_EVERY = 30.0  # seconds between progress lines of a stage write (``lines``)
DONE_DIR = ".emscale-done"  # chunk markers inside a temporary stage group, removed at commit



class ResultsStore:
    """A results directory: a Zarr v3 root group whose child groups are the stages."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.resume_keys: dict[str, str] = {}  # stage -> key under which a partial write resumes
        self.resumed: dict[str, tuple[int, int]] = {}  # stage -> (chunks found written, chunks)

    @contextlib.contextmanager
    def resumable(self, stage: str, key: str):
        """Within this block, writes of ``stage`` keep and resume their chunks under ``key``."""
        self.resume_keys[stage] = key
        try:
            yield
        finally:
            self.resume_keys.pop(stage, None)

    def create(self, attrs: dict[str, Any] | None = None) -> "ResultsStore":
        if self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()  # what a creation that failed (a full disk) left
        if not self.path.exists():  # made whole or not at all
            with atomic_directory(self.path) as tmp:
                zarr.open_group(str(tmp), mode="w", zarr_format=3)
        if not (self.path / "zarr.json").exists():
            raise StoreError(f"{self.path}: exists and is not a results store")
        root = zarr.open_group(str(self.path), mode="a", zarr_format=3)
        if attrs:
            root.attrs.update(attrs)
        self._remove_leftovers()
        consolidate(self.path)
        return self

    def _remove_leftovers(self) -> None:
        """Remove temporary groups of interrupted writes, except resumable ones (a later write
        of their stage resumes or removes them)."""
        for p in self.path.glob(f"*{PARTIAL_MARK}*"):
            if RESUME_MARK in p.name:
                continue
            log.warning("removing %s left by an interrupted run", p)
            shutil.rmtree(p, ignore_errors=True)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(zarr.open_group(str(self.path), mode="r").attrs)

    def stages(self) -> list[str]:
        if not self.path.exists():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if (p / "zarr.json").exists() and PARTIAL_MARK not in p.name)

    def has_stage(self, name: str) -> bool:
        return (self.path / name / "zarr.json").exists()

    def write_stage(
        self,
        name: str,
        ds: xr.Dataset,
        *,
        overwrite: bool = False,
        finalize: Callable[[xr.Dataset], dict[str, Any]] | None = None,
        progress: bool = False,
        resume_key: str | None = None,
        lines: Callable[[str], None] | None = None,
        every: float = PROGRESS_EVERY,
        registry=None,
        scan_nbytes: int | None = None,
    ) -> xr.Dataset:
        """Compute ``ds`` chunk by chunk into the stage group ``name``, atomically.

        ``finalize(written)`` may return attributes to add once the data are on disk (totals read
        back from small written maps, for instance) or raise to reject the stage. ``resume_key``
        (default: the one set by ``resumable``) keeps the chunks of a failed or killed write for
        the next write with the same key. Returns the stage as read back from disk (lazy; as
        ``open_stage`` with ``registry``). ``scan_nbytes`` (the scan as float32): the progress
        lines also say how fast the scan goes through the stage.
        """
        if not (self.path / "zarr.json").exists():
            self.create()
        resume_key = resume_key or self.resume_keys.get(name)
        started = utc_now()
        suffix = f"resume-{resume_key}" if resume_key else None
        with atomic_directory(self.path / name, overwrite=overwrite, suffix=suffix,
                              keep_on_error=resume_key is not None) as tmp:
            if resume_key:
                self.discard_partials(name, keep=tmp)
            found = _write_chunks(name, ds, tmp, progress=progress, lines=lines, every=every,
                                  scan_nbytes=scan_nbytes)
            if found:
                self.resumed[name] = found
            shutil.rmtree(tmp / DONE_DIR)  # all chunks are on disk: the markers have served
            group = zarr.open_group(str(tmp), mode="a", zarr_format=3)
            extra = finalize(_open(tmp)) if finalize else {}
            group.attrs.update({**(extra or {}), "stage": name, "started": started,
                                "finished": utc_now(), EVERY_CHUNK: WRITE_EMPTY_CHUNKS})
            consolidate(tmp)
        consolidate(self.path)
        log.info("wrote stage %s of %s", name, self.path)
        return self.open_stage(name, registry)

    def discard_partials(self, name: str, keep: Path | None = None) -> None:
        """Remove what interrupted writes of ``name`` left, except ``keep`` (the one resumed)."""
        for p in self.path.glob(f"{name}{PARTIAL_MARK}*"):
            if p != keep:
                log.warning("removing %s (an interrupted write not to be resumed)", p)
                shutil.rmtree(p, ignore_errors=True)

    def stage_attrs(self, name: str) -> dict[str, Any]:
        return dict(zarr.open_group(str(self.path / name), mode="r", zarr_format=3).attrs)

    def update_attrs(self, attrs: dict[str, Any], stage: str | None = None) -> None:
        """Add ``attrs`` to the root group, or to a stage group (e.g. its cache key)."""
        where = self.path if stage is None else self.path / stage
        zarr.open_group(str(where), mode="a", zarr_format=3).attrs.update(attrs)
        if stage is not None:
            consolidate(where)
        consolidate(self.path)

    def open_stage(self, name: str, registry=None) -> xr.Dataset:
        """A stage group as its readers see it (lazy; through the stage's ``reopen`` of
        ``registry``, default the pipeline's: e.g. preprocess features recomputed from the scan)."""
        if not self.has_stage(name):
            raise StoreError(f"{self.path}: no stage {name!r} (stages: {self.stages()})")
        if registry is None:
            from emscale.stages import REGISTRY as registry
        ds = _open(self.path / name)
        if ds.attrs.get(EVERY_CHUNK):
            check_every_chunk(self.path / name, name)
        stage = registry.get(name)
        return stage.reopen(ds) if stage is not None and stage.reopen is not None else ds


def results_path(path: str | os.PathLike) -> Path:
    """A results store given as itself or as the run's output directory."""
    from emscale.info import is_results_store

    path = Path(path)
    if (path / "results.zarr" / "zarr.json").is_file():
        path = path / "results.zarr"
    if not path.exists():
        raise StoreError(f"{path}: no such results store")
    if not (path / "zarr.json").is_file() or not is_results_store(path):
        raise StoreError(f"{path}: not a results store (give a run's output directory or its "
                         "results.zarr)")
    return path


def open_results(path: str | os.PathLike) -> xr.DataTree:
    """A run's results as one lazy ``xarray.DataTree``: a node per stage as its readers see it
    (``ResultsStore.open_stage``: a preprocess stage that did not store its features recomputes
    them from the scan store), the provenance in the root's attrs. ``path``: the run's output
    directory or its ``results.zarr``."""
    store = ResultsStore(results_path(path))
    nodes = {name: store.open_stage(name) for name in store.stages()}
    return xr.DataTree.from_dict({"/": xr.Dataset(attrs=store.attrs), **nodes})


def check_every_chunk(group: Path, stage: str) -> None:
    """Refuse a stage group that lost a chunk file (zarr would read its fill value: zeros or
    NaN that the next stages take for data), naming the first missing one."""
    from emscale.chunk_files import first_missing

    for meta in sorted(group.glob("*/zarr.json")):
        missing = first_missing(meta.parent)
        if missing is not None:
            file, index, _ = missing
            raise StoreError(f"{file}: chunk {index} of the {stage} stage's "
                             f"{meta.parent.name} is missing; the results store is "
                             f"damaged: rerun with --force {stage}")


# a stage group's maps are read in blocks of about this size: large enough that a pass over
# them is a few tasks, small enough that the float64 temporaries of the passes over codes
# (distances to each centre, responsibilities) stay a few hundred MB (at 64 MiB, 4.2 million
# pixels of 4-d codes, the 100 GB EELS run's cluster stage peaked at 2.65 GB per worker)
READ_BLOCK_MIB = 16


def _open(path: Path) -> xr.Dataset:
    """A stage group, lazily. Per-pixel maps are small (a few bytes a pixel), so their stored
    chunks (those of the scan) are read several at a time, in blocks of about
    ``READ_BLOCK_MIB`` for the largest variable: a pass over them is a handful of tasks, not
    thousands (the scheduler spends milliseconds per task). A group holding signals per pixel
    (features, denoised) is read as stored."""
    ds = xr.open_zarr(str(path), consolidated=False, chunks={}, zarr_format=3)
    nav = [v for v in ds.data_vars.values() if v.dims[:2] == ("y", "x") and v.chunks]
    signal_dims = {d for dims in SIGNAL_DIMS.values() for d in dims}
    if not nav or any(signal_dims & set(v.dims) for v in nav):  # signals: as stored
        return _read_directly(ds, path)
    cy, cx = nav[0].chunks[0][0], nav[0].chunks[1][0]
    pixel_bytes = max(v.dtype.itemsize * int(np.prod(v.shape[2:])) for v in nav)
    factor = int(READ_BLOCK_MIB * 2**20 // (pixel_bytes * cy * cx))
    if factor < 2:
        return _read_directly(ds, path)
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    fy = min(math.ceil(ny / cy), factor)
    fx = min(math.ceil(nx / cx), max(1, factor // fy))
    with warnings.catch_warnings():
        # a variable stored on other chunks than the first (an older group) is still read
        # right, a few of its chunks twice: not worth a warning per reader
        warnings.filterwarnings("ignore", "The specified chunks separate", UserWarning)
        return _read_directly(xr.open_zarr(str(path), consolidated=False,
                                           chunks={"y": cy * fy, "x": cx * fx}, zarr_format=3),
                              path)


def _read_directly(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """``ds``'s variables read chunk file by chunk file (``chunk_files.direct_array``), each
    block's files decoded into it: a 16 MiB block of PCA scores (16 chunk files) in 11-15 ms
    against Zarr's 18-28 ms here, and the cluster stage makes a dozen passes over such maps.
    Variables whose layout Zarr must read stay as they are."""
    from emscale.chunk_files import direct_array

    every = bool(ds.attrs.get(EVERY_CHUNK, False))
    remedy = f"rerun with --force {path.name}"
    for name, var in list(ds.data_vars.items()):
        fill = var.encoding.get("_FillValue")
        decoded = ("scale_factor" in var.encoding or "add_offset" in var.encoding
                   or var.encoding.get("dtype", var.dtype) != var.dtype
                   or (fill is not None and not (isinstance(fill, float) and math.isnan(fill))))
        if not isinstance(var.data, da.Array) or decoded:  # (xarray decodes what it reads)
            continue
        direct = direct_array(path.parent, f"{path.name}/{name}", var.data,
                              missing_is_fill=not every, remedy=remedy)
        if direct is not None:
            ds[name] = var.copy(data=direct)
    return ds


def _encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    enc = {}
    for name, var in ds.data_vars.items():
        if var.chunks is not None:
            chunks = tuple(c[0] for c in var.chunks)
        else:
            chunks = var.shape
        enc[name] = {"chunks": tuple(max(1, c) for c in chunks),
                     "compressors": default_compressors(np.dtype(var.dtype).itemsize)}
    return {**coordinate_encoding(ds), **enc}


def _layout(ds: xr.Dataset) -> dict[str, Any]:
    return {str(k): [list(v.shape), [list(c) for c in v.chunks] if v.chunks else None, str(v.dtype)]
            for k, v in ds.variables.items()}


def _write_chunks(name: str, ds: xr.Dataset, tmp: Path, *, progress: bool,
                  lines: Callable[[str], None] | None = None,
                  every: float = PROGRESS_EVERY,
                  scan_nbytes: int | None = None) -> tuple[int, int] | None:
    """Write ``ds`` into the group ``tmp``: the metadata and in-memory variables at once, then one
    task per dask chunk that stores it and leaves its marker. Chunks that already have a marker
    (from an interrupted write of the same layout into ``tmp``) are left out of the graph; when
    resuming, returns (chunks already written, all chunks)."""
    done = tmp / DONE_DIR
    layout = _layout(ds)
    resuming = (done / "layout.json").exists() and \
        json.loads((done / "layout.json").read_text()) == layout
    if not resuming:
        shutil.rmtree(tmp, ignore_errors=True)
        # the metadata, and the variables already in memory; the dask ones are written below
        ds.to_zarr(str(tmp), mode="w-", zarr_format=3, consolidated=False,
                   encoding=_encoding(ds), compute=False, write_empty_chunks=WRITE_EMPTY_CHUNKS)
        done.mkdir()
        (done / "layout.json").write_text(json.dumps(layout))
    writes, todo_keys, n_chunks, n_todo = [], [], 0, 0
    together = _nav_blocked(ds)
    if together:  # a block not marked done is rewritten whole: all its variables' chunks
        write, keys, total = _nav_block_writes(name, ds, together, tmp, done)
        writes.append(write)
        todo_keys += keys
        n_chunks += total
        n_todo += len(keys) * len(together)
    for var_name, var in ds.variables.items():
        if not isinstance(var.data, da.Array) or var_name in together:
            continue
        arr = var.data
        marks = done / str(var_name)
        marks.mkdir(exist_ok=True)
        finished = set(os.listdir(marks))
        written = arr.map_blocks(_store_chunk, str(tmp / str(var_name)), str(marks),
                                 da.core.ArraySliceDep(arr.chunks), dtype=np.int8,
                                 chunks=tuple((1,) * len(c) for c in arr.chunks),
                                 token=f"{name}-write", meta=np.empty((0,) * arr.ndim, np.int8))
        writes.append(written)
        for idx in np.ndindex(*arr.numblocks):
            n_chunks += 1
            if ".".join(map(str, idx)) not in finished:
                todo_keys.append((written.name, *idx))
                n_todo += 1
    if resuming:
        log.info("stage %s: resuming, %d of %d chunks already written", name,
                 n_chunks - n_todo, n_chunks)
    found = (n_chunks - n_todo, n_chunks) if resuming else None
    if not todo_keys:
        return found
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    merged = HighLevelGraph.merge(*[w.__dask_graph__() for w in writes])
    windows = [todo_keys[i:i + WINDOW_BLOCKS] for i in range(0, len(todo_keys), WINDOW_BLOCKS)]
    nbytes = sum(v.nbytes for v in ds.variables.values() if isinstance(v.data, da.Array))
    with _progress_lines(name, done, n_chunks, n_chunks - n_todo, nbytes, lines, every,
                         scan_nbytes):
        # one compute per window of blocks (bands of rows): the scheduler, in the client's
        # process, then holds a window's tasks, not the scan's
        for w, keys in enumerate(windows):
            # only the unfinished chunks' tasks (and what they need) go into the graph
            graph = da.Array.__dask_optimize__(merged, keys)
            if not isinstance(graph, HighLevelGraph):
                graph = HighLevelGraph.from_collections(f"{name}-write-graph", graph)
            final = f"{name}-written-{tokenize(tmp.name, keys)}"
            graph = HighLevelGraph({**graph.layers, final: {final: (len, keys)}},
                                   {**graph.dependencies, final: set(graph.layers)})
            part = f" ({w + 1} of {len(windows)})" if len(windows) > 1 else ""
            leaves = set(keys)  # each chunk's write with what only it needs, as one task
            compute(fused_into_leaves(Delayed(final, graph), leaves.__contains__),
                    description=name + part, enabled=progress)
    return found


@contextlib.contextmanager
def _progress_lines(name: str, done: Path, total: int, before: int, nbytes: int,
                    lines: Callable[[str], None] | None, every: float,
                    scan_nbytes: int | None = None):
    """While the write runs, every ``every`` seconds: chunks written of all (their markers on
    disk), GB/s of the scan (as float32) through the stage, MB/s of the stage's output and the
    time left, to ``lines`` (a batch job's log has no progress bar) and the log."""
    if lines is None:
        yield
        return
    t0 = time.monotonic()

    def report():
        n = sum(len(os.listdir(p)) for p in done.iterdir() if p.is_dir())
        new, elapsed = n - before, time.monotonic() - t0
        rate = new / elapsed if elapsed > 0 else 0.0
        left = f"about {(total - n) / rate:.0f} s left" if rate > 0 else "time left unknown"
        scan = f"{scan_nbytes * rate / total / 1e9:.2f} GB/s of the scan, " if scan_nbytes else ""
        lines(f"{n} of {total} chunks written ({100 * n / max(total, 1):.0f} %), {scan}"
              f"{nbytes * rate / total / 1e6:.1f} MB/s of output, {left}")

    with repeating(report, every, name=f"progress-{name}"):
        yield


def _nav_blocked(ds: xr.Dataset) -> list[str]:
    """The dask variables written together, one task per navigation block: those on (y, x, ...)
    with the navigation chunks of the first of them and their other dims in one chunk."""
    nav, names = None, []
    for var_name, var in ds.variables.items():
        arr = var.data
        if not isinstance(arr, da.Array) or var.dims[:2] != ("y", "x") \
                or any(len(c) > 1 for c in arr.chunks[2:]):
            continue
        nav = arr.chunks[:2] if nav is None else nav
        if arr.chunks[:2] == nav:
            names.append(str(var_name))
    return names


def _nav_block_writes(name: str, ds: xr.Dataset, names: list[str], tmp: Path, done: Path):
    """One task per navigation block that stores the block of every variable in ``names`` and
    then leaves each one's marker (fewer tasks than a store per variable and chunk: the
    scheduler's overhead per task is milliseconds). Returns (a collection, the keys of the
    blocks still to write, the number of chunks)."""
    from dask.highlevelgraph import HighLevelGraph

    arrays = [ds[n].data for n in names]
    nav = arrays[0].chunks[:2]
    starts = [np.concatenate([[0], np.cumsum(c)]) for c in nav]
    finished = []
    for n in names:
        (done / n).mkdir(exist_ok=True)
        finished.append(set(os.listdir(done / n)))
    layer = f"{name}-write-{tokenize(tmp.name, *[a.name for a in arrays])}"
    dsk, todo = {}, []
    targets = [str(tmp / n) for n in names]
    marks = [str(done / n) for n in names]
    graph = HighLevelGraph.merge(*[a.__dask_graph__() for a in arrays])
    deps = {lay for a in arrays for lay in a.__dask_layers__()}
    for i, j in np.ndindex(len(nav[0]), len(nav[1])):
        region = (slice(int(starts[0][i]), int(starts[0][i + 1])),
                  slice(int(starts[1][j]), int(starts[1][j + 1])))
        indices = [".".join(map(str, (i, j, *(0,) * (a.ndim - 2)))) for a in arrays]
        blocks = [_item_inline(graph, (a.name, i, j, *(0,) * (a.ndim - 2)), deps)
                  for a in arrays]
        dsk[(layer, i, j)] = (_store_nav_block, region, targets, marks, indices, *blocks)
        if any(ix not in f for ix, f in zip(indices, finished)):
            todo.append((layer, i, j))
    graph = HighLevelGraph({**graph.layers, layer: dsk}, {**graph.dependencies, layer: deps})

    class _Write:  # the collection protocol's one method the caller uses
        def __dask_graph__(self):
            return graph

    return _Write(), todo, len(dsk) * len(arrays)


def _item_inline(graph, key: tuple, deps: set) -> tuple:
    """A block that is an item of another task's result (``blockwise.map_nav_blocks``' outputs:
    ``getitem(result, k)``) as that getitem, to run inside the write task, which then depends
    on the result itself (its layer added to ``deps``): a stage's six maps cost one task per
    block, not seven (the scheduler spends about a millisecond per task). Else the key."""
    from dask.highlevelgraph import MaterializedLayer

    layer = graph.layers.get(key[0])  # (a Blockwise layer would be materialized by a lookup)
    task = layer.get(key) if isinstance(layer, MaterializedLayer) else None
    if isinstance(task, tuple) and len(task) == 3 and task[0] is operator.getitem \
            and isinstance(task[1], tuple) and task[1] and task[1][0] in graph.layers:
        deps.add(task[1][0])
        return task
    return key


def _store_nav_block(region, targets, marks, indices, *blocks) -> int:
    """Store one navigation block of several variables, then mark each done."""
    for target, block in zip(targets, blocks):
        z = open_target(target)
        z[region] = np.asarray(block).astype(z.dtype, copy=False)
    for mark, index in zip(marks, indices):
        Path(mark, index).touch()
    return 1


def _store_chunk(block: np.ndarray, target: str, marks: str, region: tuple[slice, ...]) -> np.ndarray:
    """Store one chunk, then mark it done (a crash in between only costs rewriting it)."""
    z = open_target(target)
    z[region] = np.asarray(block).astype(z.dtype, copy=False)
    index = ".".join(str(s.start // c) for s, c in zip(region, z.chunks))
    Path(marks, index).touch()
    return np.zeros((1,) * block.ndim, np.int8)


# ---------------------------------------------------------------------------------------------
# the layout, as documented in docs/stores.md (generated from the registry's declarations)

LAYOUT_BEGIN = "<!-- results-store layout: generated by emscale.results.layout_markdown -->"
LAYOUT_END = "<!-- end of the generated layout -->"
COMMON_ATTRS = {
    "stage": "the stage's name", "started": "UTC time the write started (ISO 8601)",
    "finished": "UTC time it was complete",
    "seconds": "wall time of the stage in the run that wrote it (its fit and its write)",
    "config_hash": "the cache key: a hash of the stage's section, the seed, the keys of the "
                   "stages it reads (and of the normal data where it uses them); a rerun with "
                   "the same key skips the stage"}
ROOT_ATTRS = {
    "provenance": "workflow (the validated file), workflow_hash, input {path, source {path, "
                  "size, sha256}}, versions, host, python, seed, started, cluster {type, "
                  "workers' batch job ids}",
    "run": "the last run: finished, ran, skipped, seconds per stage"}


def layout_markdown(registry=None) -> str:
    """The results store's groups, variables (dims, units, meaning) and attrs, from the stage
    declarations of ``registry`` (default: emscale's)."""
    from emscale.stages import REGISTRY

    registry = registry or REGISTRY
    lines = [LAYOUT_BEGIN, "", "Root group attrs:", ""]
    lines += [f"- `{k}`: {v}" for k, v in ROOT_ATTRS.items()]
    lines += ["", "Every stage group's attrs: "
              + "; ".join(f"`{k}`: {v}" for k, v in COMMON_ATTRS.items()) + ".", ""]
    for stage in registry:
        reads = ", ".join(f"`{r}`" for r in stage.reads)
        lines += [f"### `{stage.name}`: {stage.about}", "",
                  f"Reads {reads}; settings: the workflow's `{stage.name}` section"
                  + (" and where normal data come from (`anomaly.reference` / "
                     "`anomaly.normal_region`)" if stage.uses_normal else "") + ".", "",
                  "| variable | dims | units | meaning | written |", "|---|---|---|---|---|"]
        for name, out in stage.outputs.items():
            dims = ", ".join(out.dims).replace("<signal>", "signal dims")
            lines.append(f"| `{name}` | ({dims}) | {out.units or '-'} | {out.meaning} | "
                         f"{out.when or 'always'} |")
        if stage.attrs:
            lines += ["", "Attrs: " + "; ".join(f"`{k}`: {v}" for k, v in stage.attrs.items())
                      + "."]
        lines.append("")
    lines.append(LAYOUT_END)
    return "\n".join(lines)
