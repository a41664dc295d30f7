"""``emscale run``: the registry's stages in order, cached by key, with provenance.

The runner owns, once for every stage, what the stage modules do not: the cluster's client (the
stages' dask graphs run on whatever client is active), the order of stages, cache keys (a hash of
the stage's section, the seed, and the keys of what it reads), ``force`` (recompute a stage and
everything after it), resume, atomic writes, provenance in the results store's root attrs, a
progress bar per stage, and a log file in the output directory.

Around the registry's stages: ``scan`` (generate or ingest, unless the input is already a scan
store) before them, and the report after them. Each stage group is written atomically
(``ResultsStore``); its cache key is added once it is complete, so a stage that finished is
skipped on the next run. A stage killed half-way keeps the chunks it wrote (its temporary group is
named after the cache key) and the next run with the same key computes only the others; training
resumes from its last checkpoint.

Where the model learns what is normal (``anomaly.reference`` or ``anomaly.normal_region``) is
given to the stages as ``NormalData``. A reference scan gets a results store of its own
(``reference.zarr``): the stages that read only the scan (``preprocess``) run on it, and the
anomaly stage has it encoded with this run's model, through the same registry and caching.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emscale.config import utc_now
from emscale.dask_cluster import worker_hosts
from emscale.results import PROGRESS_EVERY
from emscale.errors import ConfigError, output_failure
from emscale.stages import REGISTRY, NormalData, Registry, Stage, check_outputs, described
from emscale.stages.base import Context
from emscale.workflow import WorkflowBase

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output: Path
    results: Path
    report: Path | None
    ran: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


# what a run writes in its output directory: an input may live beside these, not inside them
RUN_WRITES = ("scan.zarr", "scan.key", "results.zarr", "reference.zarr", "report", "checkpoints",
              "emscale.log", "submit.sh", ".emscale.lock")
LOCK_FILE = ".emscale.lock"


def check_inputs_apart(output: Path, inputs: dict[str, Any]) -> None:
    """Refuse an output directory that is an input, lies inside one, or where the run would
    write over one (an input inside the output directory is fine elsewhere)."""
    out = output.resolve()
    for field_name, source in inputs.items():
        if source is None:
            continue
        src = Path(source).resolve()
        if out == src or out.is_relative_to(src):
            raise ConfigError(f"output: {output} is or lies inside the {field_name} {source} "
                              "(the run would change it); choose an output outside it")
        in_place = _is_scan_store(src)  # read where it is: the run writes no scan.zarr then
        for name in RUN_WRITES:
            if in_place and name in ("scan.zarr", "scan.key"):
                continue
            if src.is_relative_to(out / name):
                raise ConfigError(f"{field_name}: {source} lies where the run writes its "
                                  f"{name} (output {output}); move it or choose another output")


def check_writable(output: Path) -> None:
    """Refuse an output directory that cannot be written (a read-only disk, no permission) or
    that is a file, before a cluster starts."""
    import os

    if output.exists() and not output.is_dir():
        raise ConfigError(f"output: {output} is a file, not a directory")
    probe = output
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"output: {output} cannot be created ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output: {output} cannot be written ({probe} is read-only or not "
                          "writable by this user)")


@contextlib.contextmanager
def output_lock(output: Path):
    """Hold an exclusive lock on the output directory for the run: a second run on the same
    output is refused at once (not left to fail on the first's half-written stage). The kernel
    drops the lock when the process dies, so a killed run leaves none behind."""
    import fcntl
    import os

    path = output / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError(f"output: {output} is in use by another emscale run ({holder}); "
                              "wait for it to finish or choose another output") from None
        except OSError as exc:  # a file system without locks (Lustre without -o flock, NFS
            if exc.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):  # sans lockd)
                raise
            log.warning("output %s: its file system has no locks (%s); two runs on it would "
                        "not be kept apart", output, exc.strerror)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()} since {utc_now()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def _on_gpu_workers(stage: Stage, note):
    """An accelerated stage's tasks (reading, model, writing) on the workers that declare a
    ``GPU`` resource, where the cluster has any; elsewhere as usual. (Training places its one
    task itself: ``trainer.train_on_cluster``.)"""
    import dask

    from emscale.dask_cluster import gpu_workers

    n = gpu_workers() if stage.accelerated else 0
    if not n:
        yield
        return
    note(f"on the {n} GPU worker(s)")
    with dask.annotate(resources={"GPU": 1}):
        yield


@contextlib.contextmanager
def _checksums_named(results, reads: tuple[str, ...]):
    """Zarr says only "Stored and computed checksum do not match" of a damaged chunk in a
    results group: find the file among the groups the stage reads and name it, with the stage
    to redo."""
    try:
        yield
    except ValueError as exc:
        if "checksum do not match" not in str(exc):
            raise
        from emscale.errors import StoreError
        from emscale.chunk_files import damaged_chunk

        for name in reads:
            if results.has_stage(name):
                bad = damaged_chunk(results.path / name)
                if bad is not None:
                    raise StoreError(f"{bad}: its checksum does not match (changed or damaged "
                                     f"since it was written); rerun with --force {name}") from exc
        raise


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("emscale", "numpy", "dask", "distributed", "xarray", "zarr", "torch",
                "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class _QuietFileHandler(logging.FileHandler):
    """A log file that goes quiet when it cannot be written (a full disk): logging's own
    handler prints every failed record, traceback and all, on stderr."""

    def handleError(self, record):
        self.setLevel(logging.CRITICAL + 1)

    def close(self):
        try:  # the last flush on a full disk: the error that filled it is the one to report
            super().close()
        except OSError:
            self.stream = None


@contextlib.contextmanager
def _log_to(path: Path):
    handler = _QuietFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("emscale")
    old_level = root.level
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


@contextlib.contextmanager
def _heartbeat(note, last: list, t0: float, every: float | None):
    """Without a terminal: when a stage has said nothing for ``every`` seconds (a fit's passes,
    a K sweep), a line with its time so far and the cluster's tasks still to do."""
    if every is None:
        yield
        return
    from emscale.progress import repeating

    def beat():
        if time.monotonic() - last[0] >= every:
            note(f"running for {time.perf_counter() - t0:.0f} s{_tasks_line()}")

    with repeating(beat, min(5.0, every), name="stage-heartbeat"):
        yield


_PENDING = ("waiting", "processing", "queued", "no-worker")


def _tasks_line() -> str:
    """The pass running (blocks done of all, GB/s, time left) and the cluster's tasks to do."""
    from emscale.reduction import pass_progress

    try:
        from distributed import get_client

        client = get_client()
        states = client.run_on_scheduler(_task_states)
        running = pass_progress(lambda key: client.run_on_scheduler(_pending_named, key))
    except (ImportError, ValueError, OSError):
        return ""
    # (finished tasks are forgotten by the scheduler: only what is left can be counted)
    todo = sum(states.get(s, 0) for s in _PENDING)
    return f": {running + '; ' if running else ''}{todo} tasks to do on the cluster"


def _task_states(dask_scheduler=None) -> dict:
    from collections import Counter

    return dict(Counter(ts.state for ts in dask_scheduler.tasks.values()))


def _pending_named(name, dask_scheduler=None) -> int:
    """Tasks still to run whose key is ``(name, i)``."""
    return sum(1 for ts in dask_scheduler.tasks.values()
               if ts.state in _PENDING and isinstance(ts.key, tuple) and ts.key[0] == name)


def stage_names(registry: Registry = REGISTRY) -> tuple[str, ...]:
    """What ``--force`` accepts, in run order."""
    return ("scan", *registry.names, "report")


def _normal_settings(workflow: WorkflowBase):
    anomaly = getattr(workflow, "anomaly", None)
    if anomaly is None:
        return None, None
    return anomaly.normal_region, anomaly.reference


def _trains(registry: Registry, until: str | None) -> bool:
    """Whether a run up to ``until`` reaches the train stage."""
    names = stage_names(registry)
    return "train" in names and (until is None or names.index(until) >= names.index("train"))


def preflight(workflow: WorkflowBase, force: tuple[str, ...] = (),
              registry: Registry = REGISTRY, until: str | None = None) -> None:
    """What can be refused before a cluster starts or anything is written: unknown ``--force``
    or ``until`` stages, a missing input or reference, a scan too small for the training split
    (the generated scan, or the reference the model trains on)."""
    from emscale.train_stream import check_split

    missing = [s.name for s in registry if s.name not in type(workflow).model_fields]
    if missing:
        raise ConfigError(f"{missing[0]}: the workflow has no section for this stage: validate it "
                          "with the same registry (load_workflow(path, registry=...))")
    names = stage_names(registry)
    unknown = sorted(set(force) - set(names))
    if unknown:
        raise ConfigError(f"--force: unknown stage {unknown[0]!r} (stages: {', '.join(names)})")
    if until is not None and until not in names:
        raise ConfigError(f"until: unknown stage {until!r} (stages: {', '.join(names)})")
    if workflow.input is not None and not Path(workflow.input).exists():
        raise ConfigError(f"input: {workflow.input}: no such file or directory")
    region, reference = _normal_settings(workflow)
    check_inputs_apart(Path(workflow.output), {"input": workflow.input,
                                               "anomaly.reference": reference})
    check_writable(Path(workflow.output))
    if (Path(workflow.output) / LOCK_FILE).exists():
        with output_lock(Path(workflow.output)):  # held by another run: refused now, not later
            pass
    tile = workflow.train.tile if _trains(registry, until) else None
    if reference is not None:
        from emscale.store import open_scan

        if not Path(reference).exists():
            raise ConfigError(f"anomaly.reference: {reference}: no such file or directory")
        if tile is not None:  # the model trains on the reference: its split must work there
            check_split(tile, tuple(open_scan(reference)["signal"].shape[:2]))
    elif workflow.synth is not None and tile is not None:
        check_split(tile, tuple(workflow.synth.shape), region)
    check_against_scan(workflow, registry, reference, until)


# above this many bytes of scatter matrix (features x features, float32) the gram solver is
# refused: each worker holds a few while the tree reduction merges them
GRAM_MAX_BYTES = 1 << 30


def scan_outline(workflow: WorkflowBase) -> tuple[str, tuple[int, int], dict, set] | None:
    """(kind, navigation shape, signal coordinates, the signal dims without a calibration) of
    the scan a workflow will read, without reading its data (a store's or raw file's metadata,
    or the generator's description)."""
    import numpy as np

    from emscale.store import SIGNAL_DIMS, check_every_chunk, open_scan

    if workflow.synth is not None:
        s = workflow.synth
        if s.kind in ("eels", "eds"):
            ds = _synth_spectra(s.kind)((2, 2), channels=s.channels)
        else:
            return "diffraction", tuple(s.shape), {d: np.arange(n, dtype=np.float64)
                                                    for d, n in zip(("ky", "kx"), s.pattern)}, set()
        return (ds.attrs["kind"], tuple(s.shape),
                {d: ds[d].values for d in SIGNAL_DIMS["spectrum"]}, set())
    src = Path(workflow.input)
    if _is_scan_store(src):
        ds = open_scan(src)
        check_every_chunk(src, ds)
        kind = ds.attrs["kind"]
        return (kind, tuple(ds["signal"].shape[:2]), {d: ds[d].values for d in SIGNAL_DIMS[kind]},
                {d for d in SIGNAL_DIMS[kind] if ds[d].attrs.get("calibrated") is False})
    from emscale.readers import open_raw

    raw = open_raw(src, lambda shape: tuple(shape))  # one chunk: only the shape is looked at
    dims = SIGNAL_DIMS[raw.kind]
    sizes = dict(zip(raw.dims, raw.data.shape))
    coords = {d: raw.coords[d][0] if d in raw.coords else np.arange(sizes[d], dtype=np.float64)
              for d in dims}
    return raw.kind, tuple(raw.data.shape[:2]), coords, {d for d in dims if d not in raw.coords}


def check_against_scan(workflow: WorkflowBase, registry: Registry, reference,
                       until: str | None = None) -> None:
    """The sections' settings against the scan's size, before a cluster starts: the chain's
    coordinate ranges, components, latent size and K against features and pixels, the gram
    solver's matrix, a reference of another signal shape. (The stages check them again.)"""
    import numpy as np

    from emscale.stages.preprocess import Preprocessor

    names = stage_names(registry)
    runs = set(names[:names.index(until) + 1] if until in names else names)
    outline = scan_outline(workflow)
    if outline is None or "preprocess" not in runs:
        return
    kind, (ny, nx), coords, uncalibrated = outline
    pre = workflow.preprocess
    ranged = [i for i, step in enumerate(pre.steps) if isinstance(step, dict)
              and step.get("step") in ("crop", "mask_channels", "background")
              and set(step) & {"start", "stop", "ranges", "window"}]
    if kind == "spectrum" and "energy" in uncalibrated and ranged:
        # a workflow's energies (keV, eV) taken as channel numbers: a run that "works"
        log.warning("preprocess.steps[%d]: its energy range is read as channel numbers: the "
                    "scan's energy axis has no calibration (emscale ingest RAW OUT --axis "
                    "energy:scale=S,offset=O,units=U gives it one)", ranged[0])
    out = Preprocessor(list(pre.steps), pre.nonfinite, pre.negative).output_coords(kind, coords)
    features, pixels = int(np.prod([v.size for v in out.values()])), ny * nx
    shape = " x ".join(str(v.size) for v in out.values())
    pca = getattr(workflow, "pca", None)
    if pca is not None and "pca" in runs:
        if pca.n_components > features:
            raise ConfigError(f"pca.n_components: {pca.n_components} is more than the {features} "
                              f"features the preprocessing leaves ({shape})")
        if pca.solver == "gram" and features * features * 4 > GRAM_MAX_BYTES:
            raise ConfigError(f"pca.solver: gram needs a {features} x {features} scatter matrix "
                              f"({features * features * 4 / 2**30:.0f} GiB) for the {features} "
                              "features; use solver: randomized, or bin/crop the signal")
    train = getattr(workflow, "train", None)
    if train is not None and "train" in runs and train.latent_dim >= features:
        raise ConfigError(f"train.latent_dim: {train.latent_dim} is not fewer than the {features} "
                          "features the preprocessing leaves: nothing to compress")
    if train is not None and "train" in runs and reference is None:
        from emscale.train_stream import check_split

        check_split(train.tile, (ny, nx), _normal_settings(workflow)[0])
    cluster = getattr(workflow, "cluster", None)
    if cluster is not None and "cluster" in runs:
        if cluster.n_clusters != "auto" and cluster.n_clusters > pixels:
            raise ConfigError(f"cluster.n_clusters: {cluster.n_clusters} is more than the "
                              f"{pixels} pixels of the {ny} x {nx} scan")
        if cluster.n_clusters == "auto" and cluster.k_range[1] > pixels:
            raise ConfigError(f"cluster.k_range: {list(cluster.k_range)} reaches beyond the "
                              f"{pixels} pixels of the {ny} x {nx} scan")
    if reference is not None:
        from emscale.store import open_scan

        from emscale.store import check_every_chunk

        ref_ds = open_scan(reference)
        check_every_chunk(reference, ref_ds)
        ref = ref_ds["signal"]
        theirs = dict(zip(ref.dims[2:], ref.shape[2:]))
        ours = {d: v.size for d, v in coords.items()}
        if theirs != ours:
            raise ConfigError(f"anomaly.reference: {reference} has signal {theirs}, the scan "
                              f"{ours}: a reference must be recorded like the scan")


@dataclass
class Lane:
    """One scan's stages: its results store, and each stage's dataset and cache key so far."""

    results: Any
    data: dict
    keys: dict
    label: str = ""                 # "" for the run's scan; "reference" for the reference scan
    main: "Lane | None" = None      # where a reference lane takes what was learned


class Runner:
    def __init__(self, workflow: WorkflowBase, *, registry: Registry = REGISTRY,
                 force: tuple[str, ...] = (), progress: bool | None = None, echo=print,
                 cluster_info: dict | None = None, until: str | None = None,
                 report: bool = True):
        preflight(workflow, force, registry, until)
        # absolute paths: a worker on another host resolves a relative one against its own
        # working directory (a relative output failed there with FileNotFoundError)
        self.wf = workflow.model_copy(update={
            k: Path(getattr(workflow, k)).absolute() for k in ("input", "output")
            if getattr(workflow, k) is not None})
        workflow = self.wf
        self.registry = registry
        names = stage_names(registry)
        first = min((names.index(s) for s in force), default=len(names))
        self.redo = set(names[first:])  # a forced stage and everything after it
        self.until = until
        self.report = report  # False: the stages only (the benchmarks: their figures)
        self.progress = progress
        self.echo = echo
        self.cluster_info = cluster_info or {}
        self.out = Path(workflow.output)
        self.result = RunResult(output=self.out, results=self.out / "results.zarr", report=None)

    @property
    def show_progress(self) -> bool:
        # a progress bar per stage on a terminal (distributed's: the tasks run on the cluster)
        return self.progress if self.progress is not None else sys.stderr.isatty()

    # -- one stage ------------------------------------------------------------------------------

    def _resolve(self, lane: Lane, name: str, normal: NormalData):
        """The dataset and key of stage ``name`` for ``lane``: computed there when it is the
        run's lane or a stage of the scan alone (preprocessing), else the run's (the model)."""
        if name not in lane.data:
            if lane.main is not None and set(self.registry[name].reads) != {"scan"}:
                lane.data[name], lane.keys[name] = self._resolve(lane.main, name, normal)
            else:
                self.execute(self.registry[name], lane, normal)
        return lane.data[name], lane.keys[name]

    def execute(self, stage: Stage, lane: Lane, normal: NormalData):
        """Build ``stage`` from its inputs and write its group, unless the group holds the same
        cache key already; returns the stage as read from disk."""
        inputs, keys = {}, []
        for name in stage.reads:
            inputs[name], key = self._resolve(lane, name, normal)
            keys.append(key)
        section = self.wf.section(stage.name)
        key = _key(stage.name, section.model_dump(mode="json"), self.wf.seed, keys,
                   normal.key if stage.uses_normal else None)
        lane.keys[stage.name] = key
        label = stage.name + (f" ({lane.label})" if lane.label else "")
        results = lane.results
        if stage.name not in self.redo and results.has_stage(stage.name) \
                and results.stage_attrs(stage.name).get("config_hash") == key:
            self.result.skipped.append(label)
            self.echo(f"[{label}] up to date (cache key {key}), skipped")
            results.discard_partials(stage.name)  # e.g. of a forced rerun that was killed
            log.info("stage %s skipped: cache key %s", label, key)
            lane.data[stage.name] = results.open_stage(stage.name, self.registry)
            return lane.data[stage.name]
        self.echo(f"[{label}] running")
        t0 = time.perf_counter()

        last = [time.monotonic()]

        def note(message: str) -> None:
            last[0] = time.monotonic()
            self.echo(f"[{label}] {message}")
            log.info("stage %s: %s", label, message)

        ctx = Context(stage=stage, config=section, inputs=inputs, seed=self.wf.seed, key=key,
                      workdir=self.out, normal=normal, note=note, progress=self.show_progress)
        with results.resumable(stage.name, key), _heartbeat(note, last, t0,
                                                            None if self.show_progress else
                                                            PROGRESS_EVERY), \
                _checksums_named(results, stage.reads), _on_gpu_workers(stage, note):
            ds = stage.build(ctx)
            check_outputs(stage, ds)
            out = results.write_stage(stage.name, described(stage, ds), overwrite=True,
                                      finalize=stage.finalize,
                                      progress=self.show_progress,
                                      lines=None if self.show_progress else note,
                                      registry=self.registry,
                                      scan_nbytes=4 * lane.data["scan"]["signal"].size)
        seconds = time.perf_counter() - t0
        results.update_attrs({"config_hash": key, "seconds": seconds}, stage=stage.name)
        if stage.name in results.resumed:
            found, total = results.resumed.pop(stage.name)
            note(f"resumed an interrupted write: {found} of {total} chunks were on disk, "
                 f"{total - found} computed")
        self.result.seconds[label] = seconds
        self.result.ran.append(label)
        log.info("stage %s done in %.1f s (cache key %s)", label, self.result.seconds[label], key)
        lane.data[stage.name] = out
        return out

    def _normal(self, lane: Lane) -> NormalData:
        """Where the model learns what is normal, for the stages that use it."""
        region, reference = _normal_settings(self.wf)
        if reference is None:
            return NormalData(region=region, key=_key(region),
                              training_features=lambda: lane.data["preprocess"])
        from emscale.results import ResultsStore
        from emscale.store import open_scan

        from emscale.store import content_stamp

        src = Path(reference)
        scan_key = _key("store", str(src.resolve()), content_stamp(src))
        ref = Lane(ResultsStore(self.out / "reference.zarr"), data={"scan": open_scan(src)},
                   keys={"scan": scan_key}, label="reference", main=lane)
        normal = NormalData(reference=src, key=_key("reference", scan_key))

        def training_features():
            return self._resolve(ref, "preprocess", NormalData())[0]

        def encoded():
            return self.execute(self.registry["encode"], ref, normal)

        normal.training_features, normal.encoded = training_features, encoded
        return normal

    # -- the run --------------------------------------------------------------------------------

    def _scan(self):
        """The scan store to read: the input store itself, or one generated or ingested into
        the output directory (cached by its description)."""
        from emscale.store import ChunkPolicy, content_stamp, open_scan, write_scan

        wf = self.wf
        path = self.out / "scan.zarr"
        marker = self.out / "scan.key"
        if wf.synth is not None:
            key = _key("synth", wf.synth.model_dump(mode="json"), wf.chunk_mib)
        else:
            src = Path(wf.input)  # its existence was checked by preflight
            if (src / "zarr.json").exists() and _is_scan_store(src):
                self.echo(f"[scan] {src} (a scan store, read in place)")
                # content, not the root's mtime: chunks rewritten in place change the key
                return open_scan(src), _key("store", str(src.resolve()), content_stamp(src))
            key = _key("ingest", str(src.resolve()), content_stamp(src), wf.chunk_mib)
        if "scan" not in self.redo and path.exists() and marker.exists() \
                and marker.read_text().strip() == key:
            self.result.skipped.append("scan")
            self.echo(f"[scan] {path} up to date, skipped")
            return open_scan(path), key
        self.echo(f"[scan] writing {path}")
        t0 = time.perf_counter()
        marker.unlink(missing_ok=True)
        policy = ChunkPolicy.of(wf.chunk_mib)
        if wf.synth is not None:
            s = wf.synth
            if s.kind in ("eels", "eds"):
                ds = _synth_spectra(s.kind)(s.shape, channels=s.channels, anomaly=s.anomaly,
                                            seed=s.seed, store_clean=s.store_clean)
            else:
                from emscale.synth.diffraction import synth_diffraction

                ds = synth_diffraction(s.shape, pattern=s.pattern, anomaly=s.anomaly, seed=s.seed,
                                        store_clean=s.store_clean)
            write_scan(ds, path, policy=policy, overwrite=True)
        else:
            from emscale.ingest import ingest

            # the workflow's value policy, not ingest's default (refuse NaN/inf): preprocessing
            # masks or zeroes them unless preprocess.nonfinite is 'error'
            pre = getattr(wf, "preprocess", None)
            nonfinite = getattr(pre, "nonfinite", "error")
            ingest(wf.input, path, policy=policy, overwrite=True,
                   allow_nonfinite=nonfinite != "error",
                   nonfinite_remedy=f"the workflow's preprocess.nonfinite is {nonfinite!r}; "
                   "'mask' leaves such pixels out of every fit and map")
        marker.write_text(key)
        self.result.seconds["scan"] = time.perf_counter() - t0
        self.result.ran.append("scan")
        return open_scan(path), key

    def run(self) -> RunResult:
        from emscale.results import ResultsStore

        self.out.mkdir(parents=True, exist_ok=True)
        with output_lock(self.out), _log_to(self.out / "emscale.log"):
            log.info("workflow %s", self.wf.model_dump_json())
            try:
                return self._run(ResultsStore(self.result.results))
            except BaseException as exc:
                # the traceback goes to the log file (INFO: the terminal shows it only with -v)
                log.info("run failed:\n%s", traceback.format_exc())
                failure = output_failure(exc, self.out, "the stages finished so far (and a "
                                         "stage's chunks written) are kept: free space and "
                                         "rerun to resume")
                if failure is not None:
                    raise failure from exc
                raise

    def _run(self, results) -> RunResult:
        wf = self.wf
        started = utc_now()
        scan, scan_key = self._scan()
        if self.until == "scan":
            return self.result
        region, reference = _normal_settings(wf)
        if wf.input is not None and reference is None and _trains(self.registry, self.until):
            from emscale.train_stream import (
                check_split,  # (the other cases: by preflight)
            )

            check_split(wf.train.tile, tuple(scan["signal"].shape[:2]), region)
        results.create({"provenance": {
            "workflow": wf.model_dump(mode="json"),
            "workflow_hash": wf.section_hash("input", "synth", *self.registry.names),
            "input": {"path": str(wf.input) if wf.input else None,
                      "source": scan.attrs.get("source", {})},
            "versions": _versions(), "host": platform.node(), "python": platform.python_version(),
            "seed": wf.seed, "started": started,
            "cluster": {**self.cluster_info, "hosts": worker_hosts()}}})
        lane = Lane(results, data={"scan": scan}, keys={"scan": scan_key})
        normal = self._normal(lane)
        for stage in self.registry:
            self.execute(stage, lane, normal)
            if stage.name == self.until:
                return self.result
        if self.report:
            self._report(results, _key(*(lane.keys[s] for s in self.registry.names)))
        results.update_attrs({"run": {"finished": utc_now(), "ran": self.result.ran,
                                      "skipped": self.result.skipped,
                                      "seconds": self.result.seconds}})
        return self.result

    def _report(self, results, report_key: str) -> None:
        report_dir = self.out / "report"
        key_file = report_dir / "report.key"
        if "report" in self.redo or not (report_dir / "index.html").exists() \
                or not key_file.exists() or key_file.read_text().strip() != report_key:
            from emscale.report import write_report

            self.echo("[report] writing")
            t0 = time.perf_counter()
            write_report(results, report_dir, timings=self._timings(results))
            key_file.write_text(report_key)
            self.result.seconds["report"] = time.perf_counter() - t0
            self.result.ran.append("report")
        else:
            self.result.skipped.append("report")
            self.echo(f"[report] up to date ({report_dir / 'index.html'}), skipped")
        self.result.report = report_dir / "index.html"

    def _timings(self, results) -> dict[str, float]:
        """Seconds per stage (build and write): this run's, or those recorded by the run that
        wrote a stage this one skipped."""
        out = {"scan": self.result.seconds["scan"]} if "scan" in self.result.seconds else {}
        for stage in self.registry.names:
            if stage in self.result.seconds:
                out[stage] = self.result.seconds[stage]
            elif results.has_stage(stage):
                a = results.stage_attrs(stage)
                if "seconds" in a:
                    out[stage] = float(a["seconds"])
                elif "started" in a and "finished" in a:  # a store written before "seconds"
                    out[stage] = (_dt.datetime.fromisoformat(a["finished"])
                                  - _dt.datetime.fromisoformat(a["started"])).total_seconds()
        return out


def _is_scan_store(path: Path) -> bool:
    return (path / "signal" / "zarr.json").exists()


def _synth_spectra(kind: str):
    """The generator of a workflow's ``synth.kind`` of spectrum image."""
    if kind == "eds":
        from emscale.synth.eds import synth_eds

        return synth_eds
    from emscale.synth.eels import synth_eels

    return synth_eels


def run_workflow(workflow: WorkflowBase, **kwargs) -> RunResult:
    """Run a workflow (``Runner``'s keyword arguments: registry, force, progress, echo,
    cluster_info, until, report)."""
    return Runner(workflow, **kwargs).run()
