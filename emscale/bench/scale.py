"""``emscale bench scale``: the shipped workflow end to end on synthetic scans of growing size.

For each kind (``eels``, ``4dstem``) and size (GB of the signal as float32) it generates a scan
(or reuses one in ``--dir``), runs the shipped workflow of that kind (``workflows/``) on the
LocalCluster that ``emscale run`` starts, and records per stage, measured in the same run:

- ``seconds`` (the stage's build and write), ``gb_per_s`` (its input: the scan as float32),
- ``passes``: how many times the stage read its input: the scan store's signal (or the stored
  features, where the workflow stores them): the stored bytes its workers read from that
  array's chunk files (``chunk_files.BYTES_READ``) over the array's size; ``results_gb_read``:
  the other bytes the workers and this process read through system calls during the stage
  (results groups read back: codes, scores, maps), ``tasks`` (tasks that finished during the
  stage),
- ``peak_worker_mem_gb`` / ``peak_client_mem_gb``: the largest RSS of any worker (from the
  scheduler's heartbeats) and of this process (scheduler and client), sampled every 0.5 s while
  the stage runs,
- ``disk_gb``: what the stage left on disk (its results group; for ``train`` also the gathered
  training set),
- ``limit_seconds``: what the stage would take at this machine's limits: its passes times its
  input's read+decode **floor** (the codec decoding every chunk on all cores, no Dask), plus the
  results bytes it read at the results groups' own read+decode rate (measured the same way over
  the run's results arrays, ``results_gb_per_s``), plus its arithmetic at the rates measured on
  the workers (PCA: the scatter matrix ``X^T X`` per block; encode: the trained model's forward
  pass; anomaly: the codes' distance to the normal density, once a pixel).
  ``chain_seconds``: what rerunning the preprocessing chain costs on those passes (the
  features are recomputed, not stored), at its rate measured on the workers: not part of the
  limit (the issue's yardstick), shown beside it: ``ratio_to_limit_with_chain`` is (limit +
  chain) / seconds, the share of the stage's time spent on work that fusing the chain implies.

Per run: the floor, the end-to-end ratio of the summed stage limits (training excluded: its
cost is set by ``epochs`` and ``max_train_pixels``, not by the scan) to the seconds, and the disk
used. Timings are figures to read, never assertions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("eels", "4dstem")
EELS_CHANNELS = 1024
PATTERN = (128, 128)
GB = 1e9


def scan_shape(kind: str, size_gb: float) -> tuple[int, int]:
    """A square-ish navigation grid whose float32 signal is ``size_gb`` GB."""
    per_pixel = 4 * (EELS_CHANNELS if kind == "eels" else PATTERN[0] * PATTERN[1])
    pixels = size_gb * GB / per_pixel
    ny = max(16, int(math.sqrt(pixels)))
    return ny, max(16, int(round(pixels / ny)))


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# the machine's limits, measured in the run


def codec_floor(store: Path, threads: int | None = None, array: str = "signal"
                ) -> tuple[float, int]:
    """Seconds to read and decode every chunk of the store's ``array`` (the scan's ``signal``,
    or ``preprocess/features`` of a results store) with the codec on all cores (a thread per
    core, Blosc's own threads off, no Dask), and the chunk count."""
    import numcodecs.blosc
    import zarr

    from zarr.codecs import Crc32cCodec

    from emscale.chunk_files import verified

    arr = zarr.open_array(str(store / array), mode="r")
    grid = [range(math.ceil(n / c)) for n, c in zip(arr.shape, arr.chunks)]
    keys = [tuple(ix) for ix in np.ndindex(*(len(g) for g in grid))]
    out_dtype = arr.dtype
    checked = isinstance(arr.compressors[-1], Crc32cCodec)  # reading checks it: so does the floor

    def decode(ix):
        path = store / array / "c" / "/".join(str(i) for i in ix)
        raw = path.read_bytes()
        raw = verified(raw, str(path)) if checked else raw
        return np.frombuffer(numcodecs.blosc.decompress(raw), out_dtype).size

    old = numcodecs.blosc.use_threads
    numcodecs.blosc.use_threads = False
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads or os.cpu_count()) as pool:
            list(pool.map(decode, keys))
        return time.perf_counter() - t0, len(keys)
    finally:
        numcodecs.blosc.use_threads = old


def _apart(fn, *args):
    """``fn(*args)`` in a spawned process: the floor's decoding buffers, kept by the allocator,
    made this process (the scheduler and client, whose peak memory is measured) 0.1 GB bigger
    at 16 GB than at 1 GB."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _syrk_rate(n_features: int, rows: int = 8192, repeats: int = 3) -> float:
    """Pixel rows per second of ``X^T X`` (float32) in this worker's threads."""
    x = np.random.default_rng(0).random((rows, n_features), dtype=np.float32)
    x.T @ x
    t0 = time.perf_counter()
    for _ in range(repeats):
        x.T @ x
    return rows * repeats / (time.perf_counter() - t0)


def _encode_rate(results: str, rows: int = 8192, repeats: int = 3) -> float:
    """Pixels per second of the encode stage's arithmetic in this worker: ``encode_block`` (the
    model's encoder and decoder, the errors, PCA's reconstruction at the same k from the PCA
    stage's scores, as the stage does) on a block in memory."""
    from emscale.model_spec import ModelSpec
    from emscale.results import ResultsStore
    from emscale.stages.encode import PCAProjection, encode_block

    store = ResultsStore(results)
    pre = store.open_stage("preprocess")
    shape = tuple(pre["features"].shape[2:])
    spec = ModelSpec.from_train_stage(store.open_stage("train"), shape)
    proj = PCAProjection.from_pca_stage(store.open_stage("pca"), spec.latent_dim)
    x = np.random.default_rng(0).random((1, rows, *shape), dtype=np.float32) / np.prod(shape)
    valid, intensity = np.ones((1, rows), bool), np.ones((1, rows), np.float32)
    scores = np.random.default_rng(1).random((1, rows, proj.k), dtype=np.float32)
    encode_block(x, valid, intensity, spec, proj, scores)
    t0 = time.perf_counter()
    for _ in range(repeats):
        encode_block(x, valid, intensity, spec, proj, scores)
    return rows * repeats / (time.perf_counter() - t0)


def _distance_rate(results: str, rows: int = 65536, repeats: int = 3) -> float:
    """Pixels per second of the anomaly stage's arithmetic in this worker: the codes' distance
    to the normal density (``_mahalanobis_block``, with as many components as the stage kept)."""
    from emscale.results import ResultsStore
    from emscale.stages.anomaly import _mahalanobis_block

    store = ResultsStore(results)
    d = int(store.open_stage("encode")["latent"].shape[-1])
    about = store.open_stage("anomaly").attrs.get("anomaly", {})
    k = max(1, sum(about.get("mixture_major") or [True]))
    rng = np.random.default_rng(0)
    z = rng.standard_normal((rows, d)).astype(np.float32)
    precisions = np.broadcast_to(np.eye(d), (k, d, d))
    args = (rng.standard_normal((k, d)), precisions, np.zeros(k))
    _mahalanobis_block(z, *args)
    t0 = time.perf_counter()
    for _ in range(repeats):
        _mahalanobis_block(z, *args)
    return rows * repeats / (time.perf_counter() - t0)


def _chain_rate(results: str, repeats: int = 3) -> float:
    """Pixels per second of the preprocessing chain (value policy and steps, as fitted) on the
    scan's first block, in this worker: what each pass that recomputes the features adds to
    reading and decoding."""
    import functools

    from emscale.results import ResultsStore
    from emscale.stages.preprocess import Preprocessor, _run_chain
    from emscale.store import open_scan

    pre = ResultsStore(results).open_stage("preprocess")
    scan = open_scan(pre.attrs["scan_store"]) if "scan_store" in pre.attrs else None
    if scan is None:
        return float("nan")
    chain = Preprocessor.restore(pre.attrs["preprocess"], scan)
    block = np.asarray(scan["signal"].data.blocks[(0,) * scan["signal"].ndim])
    fn = functools.partial(_run_chain, steps=tuple(chain.steps_), nonfinite=chain.nonfinite,
                           negative=chain.negative)
    where = np.array([0, 0, 1])
    fn(where, block)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(where, block)
    return block.shape[0] * block.shape[1] * repeats / (time.perf_counter() - t0)


def _read_chars() -> int:
    """Bytes this process has read through system calls (page-cache hits included)."""
    import psutil

    return psutil.Process().io_counters().read_chars


def _chunk_bytes_read(arrays: list[str]) -> list[int]:
    """Stored bytes this process has read from each of ``arrays``' chunk files."""
    from emscale.chunk_files import BYTES_READ

    wanted = [os.path.realpath(a) for a in arrays]
    got = [0] * len(arrays)
    for array, n in list(BYTES_READ.items()):
        real = os.path.realpath(array)
        for i, w in enumerate(wanted):
            got[i] += n if real == w else 0
    return got


def results_floor(results: Path, skip: tuple[str, ...] = ("preprocess/features",),
                  min_bytes: int = 2**20) -> float:
    """Stored bytes per second of reading and decoding the run's results arrays (each one's
    chunks by ``codec_floor``; arrays under ``min_bytes`` and ``skip`` left out): the limit of
    a stage's reading back codes, scores and maps."""
    stored = seconds = 0.0
    for meta in sorted(results.glob("*/*/zarr.json")):
        array = meta.parent
        name = f"{array.parent.name}/{array.name}"
        size = _du(array / "c")
        if name in skip or size < min_bytes or '"node_type": "array"' not in meta.read_text():
            continue
        seconds += codec_floor(array.parent, array=array.name)[0]
        stored += size
    return stored / seconds if seconds else float("inf")


def _on_all_workers(client, fn, *args) -> float:
    """The summed rate of ``fn`` run on every worker at once (as a stage runs)."""
    return float(sum(client.run(fn, *args).values()))


# ---------------------------------------------------------------------------------------------
# sampling during the run


def _task_counter():
    """A scheduler plugin that counts finished tasks."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class TaskCounter(SchedulerPlugin):
        name = TASK_COUNTER

        def __init__(self):
            self.done = 0

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "memory":
                self.done += 1

    return TaskCounter()


TASK_COUNTER = "emscale-task-counter"


class _Sampler:
    """Peak RSS of the workers and of this process per stage, every ``every`` seconds; the
    current stage is set by the runner's messages."""

    def __init__(self, client, every: float = 0.5):
        import psutil

        self.client, self.every = client, every
        self.proc = psutil.Process()
        self.stage = None
        self.peaks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        stage = self.stage
        if stage is None:
            return
        workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        wmem = max((w.get("metrics", {}).get("memory", 0) for w in workers), default=0)
        peak = self.peaks.setdefault(stage, {"worker": 0.0, "client": 0.0})
        peak["worker"] = max(peak["worker"], wmem / GB)
        peak["client"] = max(peak["client"], self.proc.memory_info().rss / GB)

    def _loop(self):
        while not self._stop.wait(self.every):
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - a missed sample must not stop the run
                log.debug("sample failed: %s", exc)


# ---------------------------------------------------------------------------------------------
# one run


@dataclass
class StageFigures:
    seconds: float
    gb_per_s: float
    limit_seconds: float | None
    ratio_to_limit: float | None
    chain_seconds: float
    ratio_to_limit_with_chain: float | None  # (limit + chain_seconds) / seconds
    passes: float
    results_gb_read: float
    tasks: int
    peak_worker_mem_gb: float
    peak_client_mem_gb: float
    disk_gb: float


@dataclass
class ScaleRun:
    kind: str
    size_gb: float
    shape: list
    store_gb: float
    synth_seconds: float | None
    floor_seconds: float
    floor_gb_per_s: float
    end_to_end_seconds: float
    end_to_end_ratio_to_floor: float
    end_to_end_ratio_to_limit: float
    end_to_end_ratio_to_limit_with_chain: float
    disk_gb: float
    rates: dict
    stages: dict = field(default_factory=dict)
    results_gb_per_s: float | None = None  # the results arrays' read+decode rate (stored bytes)
    features_stored: bool = False  # the stages after preprocess read stored features
    features_floor_seconds: float | None = None  # their read+decode floor
    # where the model ran: the training's device, its epochs and samples/s, GPU workers (encode)
    training: dict = field(default_factory=dict)
    gpu_workers: int = 0


def generate(kind: str, size_gb: float, path: Path, seed: int = 0, chunk_mib: float = 64.0,
             echo=print) -> float | None:
    """Write the synthetic scan (anomalies on) unless it is there; seconds taken (None: reused)."""
    from emscale.store import ChunkPolicy, write_scan

    if (path / "zarr.json").exists():
        return None
    shape = scan_shape(kind, size_gb)
    echo(f"[bench scale] generating {path}: {kind} {shape[0]} x {shape[1]}")
    if kind == "eels":
        from emscale.synth.eels import synth_eels

        ds = synth_eels(shape, channels=EELS_CHANNELS, anomaly=True, seed=seed)
    else:
        from emscale.synth.diffraction import synth_diffraction

        ds = synth_diffraction(shape, pattern=PATTERN, anomaly=True, seed=seed)
    t0 = time.perf_counter()
    write_scan(ds, path, overwrite=True, policy=ChunkPolicy.of(chunk_mib))
    return time.perf_counter() - t0


def _workflow(kind: str, scan: Path, out: Path, overrides: dict):
    from emscale.workflow import load_workflow

    name = "eels-phase-mapping.yaml" if kind == "eels" else "4dstem-phase-mapping.yaml"
    wf = load_workflow(Path(__file__).parents[2] / "workflows" / name)
    data = wf.model_dump(mode="json")
    data.update(input=str(scan), output=str(out))
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        data[section][key] = value
    return type(wf).model_validate(data)


def run_one(kind: str, size_gb: float, workdir: Path, *, cluster_cfg=None, overrides=None,
            keep: bool = False, chunk_mib: float = 64.0, echo=print) -> ScaleRun:
    """Generate (or reuse) the scan, run the shipped workflow on it, measure. ``cluster_cfg``:
    a loaded cluster file or its path (default: the LocalCluster ``emscale run`` starts)."""
    from emscale.dask_cluster import (default_cluster_file, gpu_workers, load_cluster_file,
                                      open_cluster)
    from emscale.results import ResultsStore
    from emscale.runner import Runner
    from emscale.store import open_scan

    scan = workdir / f"{kind}-{size_gb:g}gb.zarr"
    out = workdir / f"{kind}-{size_gb:g}gb-run"
    synth_seconds = generate(kind, size_gb, scan, chunk_mib=chunk_mib, echo=echo)
    shutil.rmtree(out, ignore_errors=True)
    signal = open_scan(scan)["signal"]
    store_bytes = _du(scan / "signal")
    n_pixels = int(signal.shape[0] * signal.shape[1])
    input_gb = n_pixels * int(np.prod(signal.shape[2:])) * 4 / GB
    wf = _workflow(kind, scan, out, overrides or {})
    if isinstance(cluster_cfg, (str, os.PathLike)):
        cluster_cfg = load_cluster_file(cluster_cfg)
    cfg = cluster_cfg or default_cluster_file()
    with open_cluster(cfg) as (_cluster, client):
        floor_s, n_chunks = _apart(codec_floor, scan)
        echo(f"[bench scale] {kind} {size_gb:g} GB ({input_gb:.2f} GB float32, {n_chunks} "
             f"chunks): read+decode floor {floor_s:.1f} s = {input_gb / floor_s:.2f} GB/s")
        client.run_on_scheduler(_install_counter)
        marks: list[tuple[str, float, int, int, np.ndarray]] = []
        inputs = [str(scan / "signal"), str(out / "results.zarr" / "preprocess" / "features")]

        def snapshot():
            read = sum(client.run(_read_chars).values()) + _read_chars()
            # stored bytes read from the scan's and the stored features' chunk files
            chunks = np.sum([*client.run(_chunk_bytes_read, inputs).values(),
                             _chunk_bytes_read(inputs)], axis=0)
            return client.run_on_scheduler(_read_counter), read, chunks

        sampler = _Sampler(client)

        def hook(message: str) -> None:
            echo(message)
            # a stage starts ("[NAME] running", "[report] writing"); not its progress lines
            if message.startswith("[") and message.endswith(("] running", "] writing")):
                stage = message[1:message.index("]")]
                sampler.sample()  # the stage ending gets a sample however short it was
                marks.append((stage, time.perf_counter(), *snapshot()))
                sampler.stage = stage
                sampler.sample()

        t0 = time.perf_counter()
        with sampler:
            # the stages (the report is not measured: 10-15 s a run at these sizes)
            result = Runner(wf, echo=hook, progress=False, report=False).run()
        total = time.perf_counter() - t0
        marks.append(("end", time.perf_counter(), *snapshot()))
        n_features = int(np.prod(_features_shape(result.results)))
        # stored features (store_features): the stages after preprocess read those, not the scan
        stored = ResultsStore(result.results).open_stage("preprocess").attrs.get("features_stored")
        features_dir = result.results / "preprocess" / "features"
        features_floor_s = codec_floor(result.results / "preprocess", array="features")[0] \
            if stored else None
        results_rate = results_floor(result.results)
        gpus = gpu_workers()
        rates = {"syrk_rows_per_s": _on_all_workers(client, _syrk_rate, n_features),
                 "encode_pixels_per_s": _on_all_workers(client, _encode_rate,
                                                         str(result.results)),
                 "distance_pixels_per_s": _on_all_workers(client, _distance_rate,
                                                          str(result.results)),
                 "chain_pixels_per_s": _on_all_workers(client, _chain_rate, str(result.results))}
    stages: dict[str, StageFigures] = {}
    for (name, t_start, d0, r0, c0), (_n, t_end, d1, r1, c1) in zip(marks, marks[1:]):
        if name in ("scan", "report"):
            continue
        seconds = float(result.seconds.get(name, t_end - t_start))
        reads_features = stored and name not in ("preprocess", "train")
        # passes over what the stage reads: the stored features, or the scan; the rest of what
        # it read (results groups, and small files) at the results arrays' own rate
        scan_read, features_read = (c1 - c0).tolist()
        passes = features_read / _du(features_dir) if reads_features else scan_read / store_bytes
        floor = features_floor_s if reads_features else floor_s
        results_read = max(0, (r1 - r0) - scan_read - features_read)
        compute = {"pca": n_pixels / rates["syrk_rows_per_s"],
                   "encode": n_pixels / rates["encode_pixels_per_s"],
                   "anomaly": n_pixels / rates["distance_pixels_per_s"]}.get(name, 0.0)
        limit = None if name == "train" else \
            passes * floor + results_read / results_rate + compute
        disk = _du(result.results / name) + (sum(_du(p) for p in (out / "checkpoints").glob(
            "*/train_set.zarr")) if name == "train" else 0)
        peak = sampler.peaks.get(name, {"worker": float("nan"), "client": float("nan")})
        chain = 0.0 if name in ("train", "anomaly") or reads_features else \
            round(passes) * n_pixels / rates["chain_pixels_per_s"]
        stages[name] = StageFigures(
            seconds=seconds, gb_per_s=input_gb / seconds, limit_seconds=limit,
            ratio_to_limit=None if limit is None else limit / seconds, passes=round(passes, 2),
            results_gb_read=results_read / GB,
            chain_seconds=chain,
            ratio_to_limit_with_chain=None if limit is None else (limit + chain) / seconds,
            tasks=d1 - d0, peak_worker_mem_gb=peak["worker"], peak_client_mem_gb=peak["client"],
            disk_gb=disk / GB)
    timed = {n: s for n, s in stages.items() if n != "train"}
    run_seconds = sum(s.seconds for s in timed.values())
    limits = sum(s.limit_seconds for s in timed.values() if s.limit_seconds)
    chains = sum(s.chain_seconds for s in timed.values())
    store_gb = _du(scan) / GB
    trained = ResultsStore(result.results).open_stage("train")
    about = trained.attrs.get("train", {})
    training = {"device": about.get("device"), "epochs": int(trained.sizes["epoch"]),
                "median_epoch_seconds": float(np.median(trained["epoch_seconds"].values)),
                "samples_per_s": about.get("samples_per_s")}
    run = ScaleRun(
        kind=kind, size_gb=size_gb, shape=list(signal.shape), store_gb=store_gb,
        synth_seconds=synth_seconds, floor_seconds=floor_s, floor_gb_per_s=input_gb / floor_s,
        end_to_end_seconds=total,
        end_to_end_ratio_to_floor=floor_s / run_seconds if run_seconds else float("nan"),
        end_to_end_ratio_to_limit=limits / run_seconds if run_seconds else float("nan"),
        end_to_end_ratio_to_limit_with_chain=(limits + chains) / run_seconds if run_seconds
        else float("nan"),
        disk_gb=(_du(out) + _du(scan)) / GB, rates=rates,
        stages={n: asdict(s) for n, s in stages.items()}, results_gb_per_s=results_rate / GB,
        features_stored=bool(stored),
        features_floor_seconds=features_floor_s, training=training, gpu_workers=gpus)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return run


def _install_counter(dask_scheduler=None):
    dask_scheduler.add_plugin(_task_counter(), name=TASK_COUNTER, idempotent=False)


def _read_counter(dask_scheduler=None):
    return dask_scheduler.plugins[TASK_COUNTER].done


def _features_shape(results: Path) -> tuple[int, ...]:
    from emscale.results import ResultsStore

    return tuple(ResultsStore(results).open_stage("preprocess")["features"].shape[2:])


# ---------------------------------------------------------------------------------------------
# several runs


def run_scale_bench(sizes, kinds=KINDS, workdir: str | os.PathLike = "bench-scale", *,
                    cluster_cfg=None, overrides=None, keep_scans: bool = True,
                    chunk_mib: float = 64.0, echo=print) -> list[ScaleRun]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for kind in kinds:
        for size in sizes:
            runs.append(_in_fresh_process(run_one, kind, float(size), workdir,
                                          cluster_cfg=cluster_cfg, overrides=overrides,
                                          chunk_mib=chunk_mib, echo=echo))
            echo(table([runs[-1]]))
            if not keep_scans:
                shutil.rmtree(workdir / f"{kind}-{size:g}gb.zarr", ignore_errors=True)
    return runs


def _in_fresh_process(fn, *args, echo=print, **kwargs):
    """``fn(*args, **kwargs, echo=...)`` in a new (spawned) process, its messages forwarded to
    ``echo``: each run's client memory is its own (runs one after the other in one process had
    read as the client growing with the scan: 1.22 -> 1.76 GB over 4, 16, 48 GB of 4D-STEM)."""
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        messages = manager.Queue()

        def forward():
            while (message := messages.get()) is not None:
                echo(message)

        forwarder = threading.Thread(target=forward, name="bench-echo", daemon=True)
        forwarder.start()
        try:
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                return pool.submit(fn, *args, echo=messages.put, **kwargs).result()
        finally:
            messages.put(None)
            forwarder.join()


def table(runs: list[ScaleRun]) -> str:
    lines = []
    for r in runs:
        lines.append(f"{r.kind} {r.size_gb:g} GB {r.shape}: store {r.store_gb:.2f} GB, floor "
                     f"{r.floor_gb_per_s:.2f} GB/s, end to end {r.end_to_end_seconds:.0f} s, "
                     f"{100 * r.end_to_end_ratio_to_limit:.0f} % of the summed limits "
                     f"({100 * r.end_to_end_ratio_to_limit_with_chain:.0f} % with the chain; "
                     f"training out), disk {r.disk_gb:.2f} GB")
        if r.results_gb_per_s:
            lines.append(f"  results read back at {r.results_gb_per_s:.2f} GB/s (stored bytes, "
                         "read+decode floor of the run's results arrays)")
        if r.training:
            t = r.training
            rate = f", {t['samples_per_s']:,.0f} samples/s" if t.get("samples_per_s") else ""
            lines.append(f"  training on {t['device']}: {t['epochs']} epochs of "
                         f"{t['median_epoch_seconds']:.1f} s{rate}; "
                         f"{r.gpu_workers} GPU worker(s) for encoding")
        if r.features_stored:
            lines.append(f"  features stored: the stages after preprocess read them (floor "
                         f"{r.features_floor_seconds:.1f} s a pass), not the scan")
        lines.append(f"  {'stage':<11}{'s':>8}{'GB/s':>7}{'limit s':>9}{'% lim':>7}{'chain s':>9}"
                     f"{'% +chain':>9}{'passes':>7}{'res GB':>7}{'tasks':>8}{'worker GB':>10}"
                     f"{'client GB':>10}{'disk GB':>9}")
        for name, s in r.stages.items():
            lim = "" if s["limit_seconds"] is None else f"{s['limit_seconds']:.1f}"
            pct = "" if s["ratio_to_limit"] is None else f"{100 * s['ratio_to_limit']:.0f}"
            lines.append(f"  {name:<11}{s['seconds']:>8.1f}{s['gb_per_s']:>7.2f}{lim:>9}{pct:>7}"
                         f"{s.get('chain_seconds', 0.0):>9.1f}"
                         f"{_percent(s.get('ratio_to_limit_with_chain')):>9}"
                         f"{s['passes']:>7.2f}{s.get('results_gb_read', 0.0):>7.2f}"
                         f"{s['tasks']:>8}{s['peak_worker_mem_gb']:>10.2f}"
                         f"{s['peak_client_mem_gb']:>10.2f}{s['disk_gb']:>9.3f}")
    return "\n".join(lines)


def scaling(runs: list[ScaleRun], from_gb: float = 4.0) -> dict:
    """Per kind, whether time is linear in size: the stages' seconds without training (whose
    cost is set by epochs and ``max_train_pixels``, not by the scan) at each size from
    ``from_gb`` up, their seconds per GB, and the marginal seconds per GB between consecutive
    sizes (the slope: fixed costs, the K sweep or a cluster's start, cancel in it), with the
    spread of those slopes (largest over smallest, minus one)."""
    out = {}
    for kind in sorted({r.kind for r in runs}):
        rs = sorted((r for r in runs if r.kind == kind and r.size_gb >= from_gb),
                    key=lambda r: r.size_gb)
        if len(rs) < 2:
            continue
        sizes = [r.size_gb for r in rs]
        secs = [sum(st["seconds"] for name, st in r.stages.items() if name != "train")
                for r in rs]
        limits = [sum(st.get("limit_seconds") or 0.0 for name, st in r.stages.items()
                      if name != "train") for r in rs]
        slopes = [(b - a) / (y - x) for x, y, a, b in zip(sizes, sizes[1:], secs, secs[1:])]
        out[kind] = {"sizes_gb": sizes, "seconds_without_training": secs,
                     "seconds_per_gb": [t / g for t, g in zip(secs, sizes)],
                     "marginal_seconds_per_gb": slopes,
                     "marginal_spread": max(slopes) / min(slopes) - 1
                     if len(slopes) > 1 and min(slopes) > 0 else None,
                     # the limits' growth over the seconds' between sizes: the work that grows
                     # with the scan against its limit, fixed costs (a K sweep) cancelled
                     "marginal_ratio_to_limit": [(lb - la) / (b - a) if b > a else None
                                                 for la, lb, a, b in zip(limits, limits[1:],
                                                                         secs, secs[1:])]}
    return out


def scaling_table(runs: list[ScaleRun]) -> str:
    lines = []
    for kind, sc in scaling(runs).items():
        per = ", ".join(f"{g:g} GB {t:.0f} s ({t / g:.2f} s/GB)"
                        for g, t in zip(sc["sizes_gb"], sc["seconds_without_training"]))
        slopes = ", ".join(f"{a:g}-{b:g} GB {m:.2f}" for a, b, m in zip(
            sc["sizes_gb"], sc["sizes_gb"][1:], sc["marginal_seconds_per_gb"]))
        spread = "" if sc["marginal_spread"] is None else \
            f"; slopes within {100 * sc['marginal_spread']:.0f} %"
        ratios = ", ".join(f"{a:g}-{b:g} GB {_percent(m)} %" for a, b, m in zip(
            sc["sizes_gb"], sc["sizes_gb"][1:], sc["marginal_ratio_to_limit"]))
        lines.append(f"{kind} scaling, training out: {per}; marginal s/GB {slopes}{spread}; "
                     f"marginal limits over marginal seconds {ratios}")
    return "\n".join(lines)


def _percent(ratio) -> str:
    return "" if ratio is None else f"{100 * ratio:.0f}"


def environment() -> dict:
    import platform

    import psutil

    from emscale.dask_cluster import worker_environment

    return {"host": platform.node(), "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / GB, 1),
            "worker_environment": worker_environment(),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}


def write_json(runs: list[ScaleRun], path: Path) -> None:
    path.write_text(json.dumps({"environment": environment(),
                                "runs": [asdict(r) for r in runs],
                                "scaling": scaling(runs)}, indent=2))


def plot(runs: list[ScaleRun], path: Path) -> None:
    """Seconds per stage and peak memory against scan size, one column per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r.kind for r in runs})
    fig, axes = plt.subplots(2, len(kinds), figsize=(6 * len(kinds), 7), squeeze=False)
    for col, kind in enumerate(kinds):
        rs = sorted((r for r in runs if r.kind == kind), key=lambda r: r.size_gb)
        sizes = [r.size_gb for r in rs]
        ax = axes[0, col]
        # a marker and dash per stage: stages of equal seconds (PCA and encode) stay visible
        styles = ["o-", "s--", "^-.", "v:", "D-", "P--", "X-."]
        for i, name in enumerate(rs[0].stages):
            ax.plot(sizes, [r.stages.get(name, {}).get("seconds", np.nan) for r in rs],
                    styles[i % len(styles)], label=name, markerfacecolor="none")
        ax.plot(sizes, [r.end_to_end_seconds for r in rs], "k--", label="end to end")
        ax.set(xscale="log", yscale="log", xlabel="scan size (GB as float32)", ylabel="seconds",
               title=f"{kind}: time per stage")
        ax.legend(fontsize=8)
        ax = axes[1, col]
        ax.plot(sizes, [max(s["peak_worker_mem_gb"] for s in r.stages.values()) for r in rs],
                "o-", label="peak worker RSS")
        ax.plot(sizes, [max(s["peak_client_mem_gb"] for s in r.stages.values()) for r in rs],
                "s-", label="peak client RSS")
        ax.set(xscale="log", xlabel="scan size (GB as float32)", ylabel="GB",
               title=f"{kind}: peak memory", ylim=(0, None))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
