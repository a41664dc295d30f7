"""``emscale bench pca STORE``: every PCA method on the same store and workers, against its floor.

In one run, on one LocalCluster (``n_workers`` processes x ``threads`` threads, emscale's worker
environment, ``emscale.dask_cluster``):

- the **floor**: a dask sum over the store's ``signal`` (read + decompress, nothing else), run
  twice, the first to warm the page cache for every method alike;
- the **reference**: exact PCA from a float64 centred scatter matrix (tree-reduced like ``gram``);
- emscale's solvers (``gram``, ``randomized``, ``incremental``) on the float32 feature view;
- where installed, HyperSpy's lazy decomposition (``SVD`` and its incremental ``PCA``) and a
  scikit-learn ``IncrementalPCA.partial_fit`` loop over the blocks, both in the client process
  with 2 threads (HyperSpy's lazy decomposition does not run on the distributed scheduler).

Throughput is GB/s of float32 input (pixels x features x 4 bytes) whatever the stored dtype. Peak
memory is the kernel's high-water mark (VmHWM, reset before each method) of the busiest worker
process, or of the client process for the client-side methods. The angle is the largest principal
angle between the method's k-dimensional subspace and the reference's.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dask
import numpy as np

from emscale.bench.memory import peak_bytes, reset_peak

log = logging.getLogger(__name__)

EMSCALE_METHODS = ("gram", "randomized", "incremental")
OTHER_METHODS = ("hyperspy-svd", "hyperspy-pca", "sklearn-ipca-loop")
ALL_METHODS = EMSCALE_METHODS + OTHER_METHODS


@dataclass
class Row:
    method: str
    seconds: float
    gb_per_s: float
    peak_worker_mem_gb: float
    max_principal_angle_rad: float
    where: str = "cluster"
    note: str = ""


@dataclass
class PCABench:
    store: str
    shape: list
    dtype: str
    chunks: list
    float32_gb: float
    n_components: int
    preprocess: list
    features: int
    workers: str
    environment: dict
    floor_gb_per_s: float
    floor_seconds: float
    reference_eigengap: float = float("nan")
    rows: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"PCA bench: {self.store} {self.shape} {self.dtype}, {self.float32_gb:.2f} GB as "
                 f"float32, chunks {self.chunks}, k={self.n_components}, {self.workers}",
                 f"features: {self.features}" + (f" after fused preprocessing {self.preprocess}"
                                                 if self.preprocess else " (raw signal as float32)"),
                 f"environment: {self.environment}",
                 f"read+decompress floor: {self.floor_seconds:.2f} s, {self.floor_gb_per_s:.3f} GB/s; "
                 f"exact eigengap at k (lambda_k / lambda_k+1): {self.reference_eigengap:.3f}",
                 f"{'method':<20}{'where':>9}{'seconds':>10}{'GB/s':>9}{'% floor':>9}"
                 f"{'peak GB':>9}{'angle rad':>12}  note"]
        for r in self.rows:
            r = r if isinstance(r, dict) else asdict(r)
            pct = 100 * r["gb_per_s"] / self.floor_gb_per_s if self.floor_gb_per_s else float("nan")
            lines.append(f"{r['method']:<20}{r['where']:>9}{r['seconds']:>10.2f}{r['gb_per_s']:>9.3f}"
                         f"{pct:>8.0f}%{r['peak_worker_mem_gb']:>9.2f}"
                         f"{r['max_principal_angle_rad']:>12.2e}  {r['note']}")
        return "\n".join(lines)

    def json_summary(self) -> dict:
        return {"floor_gb_per_s": self.floor_gb_per_s,
                "rows": [{k: (r if isinstance(r, dict) else asdict(r))[k] for k in
                          ("method", "seconds", "gb_per_s", "peak_worker_mem_gb",
                           "max_principal_angle_rad")} for r in self.rows],
                "details": self.to_dict()}


# -- memory high-water marks --------------------------------------------------------------------


# -- the reference ------------------------------------------------------------------------------


def _scatter64_block(x):
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    c = x - mean
    return {"n": len(x), "mean": mean, "m2": c.T @ c}


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.linalg import subspace_angles

    return float(subspace_angles(np.asarray(a, np.float64).T, np.asarray(b, np.float64).T).max())


# -- the run ------------------------------------------------------------------------------------


def run_pca_bench(store: str | os.PathLike, *, methods=ALL_METHODS, n_components: int = 8,
                  n_workers: int = 2, threads: int = 1, memory_limit: str = "4GiB",
                  tuned: bool = True, preprocess: list | None = None) -> PCABench:
    from distributed import Client

    from emscale.dask_cluster import local_cluster, worker_environment
    from emscale.reduction import tree_reduce
    from emscale.stages.pca import PCA, merge_scatter
    from emscale.store import feature_matrix, open_scan

    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        from emscale.errors import ConfigError

        raise ConfigError(f"bench pca: unknown method(s) {unknown}; known: {list(ALL_METHODS)}")
    scan = open_scan(store)
    sig = scan["signal"]
    gb = int(np.prod(sig.shape)) * 4 / 1e9  # the raw store as float32
    chain = None
    if preprocess:
        from emscale.stages.preprocess import Preprocessor

        chain = Preprocessor(preprocess)

    def features():
        """The float32 (pixels, features) view the emscale methods fit: the raw signal, or the
        preprocessing chain fused into the same pass (its fit statistics, if any, precomputed)."""
        s = open_scan(store)
        if chain is None:
            return feature_matrix(s), None
        out = chain.transform(s)
        return feature_matrix(out["features"]), feature_matrix(out["valid"])[:, 0].astype(bool)

    env = worker_environment(keep_blas_coretype=not tuned) if tuned else {}
    cluster = local_cluster(n_workers, threads, memory_limit, dashboard_address=None,
                            keep_blas_coretype=not tuned) if tuned else _plain_cluster(
                                n_workers, threads, memory_limit)
    with cluster, Client(cluster) as client:
        def measured(fn):
            client.run(reset_peak)
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
            peak = max(client.run(peak_bytes).values()) / 1e9
            return out, seconds, peak

        sig.data.sum().compute()  # warm the page cache for every method alike
        _, floor_s, _ = measured(lambda: sig.data.sum().compute())
        log.info("floor %.2f s", floor_s)
        if chain is not None:
            chain.fit(scan)
        x, valid = features()
        if valid is not None:
            valid_all = bool(valid.all().compute())
            if not valid_all:
                log.warning("some pixels are invalid; the reference still uses all of them")
        ref_stats = tree_reduce(_scatter64_block, merge_scatter, x, name="bench-ref").compute()
        eigval, eigvec = np.linalg.eigh(ref_stats["m2"])
        order = np.argsort(eigval)[::-1]
        ref = eigvec[:, order[:n_components]].T
        ev = eigval[order]
        # how well defined the k-dimensional subspace is: near 1, any approximate method's
        # k-th component is arbitrary within the noise and its angle says little
        eigengap = float(ev[n_components - 1] / ev[n_components]) if n_components < len(ev) else float("inf")
        result = PCABench(
            store=str(store), shape=list(sig.shape), dtype=str(sig.dtype),
            chunks=[c[0] for c in sig.chunks], float32_gb=gb, n_components=n_components,
            preprocess=preprocess or [], features=int(x.shape[1]),
            workers=f"LocalCluster {n_workers} workers x {threads} thread(s), {memory_limit} each",
            environment={"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "worker_env": env,
                         "client_OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")},
            floor_gb_per_s=gb / floor_s, floor_seconds=floor_s, reference_eigengap=eigengap)
        for method in methods:
            if method not in EMSCALE_METHODS and chain is not None:
                log.warning("%s does not take emscale's preprocessing: skipped", method)
                continue
            if method in EMSCALE_METHODS:
                pca, seconds, peak = measured(
                    lambda: PCA(n_components, solver=method).fit(*features()))
                row = Row(method, seconds, gb / seconds, peak, _angle(pca.components_, ref))
            else:
                row = _client_side(method, store, n_components, threads * n_workers, gb, ref)
            if row is not None:
                log.info("%s", row)
                result.rows.append(row)
    return result


def _plain_cluster(n_workers, threads, memory_limit):
    from distributed import LocalCluster

    return LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True,
                        memory_limit=memory_limit, dashboard_address=None)


def _client_side(method, store, k, threads, gb, ref) -> Row | None:
    from emscale.store import feature_matrix, open_scan

    scan = open_scan(store)
    reset_peak()
    with dask.config.set(scheduler="threads", num_workers=threads):
        if method.startswith("hyperspy"):
            try:
                import hyperspy.api as hs
            except ImportError:
                log.warning("hyperspy is not installed: skipping %s", method)
                return None
            data = scan["signal"].data.astype(np.float32)
            s = hs.signals.Signal1D(data) if scan.attrs["kind"] == "spectrum" else hs.signals.Signal2D(data)
            s = s.as_lazy()
            algorithm = "SVD" if method == "hyperspy-svd" else "PCA"
            t0 = time.perf_counter()
            s.decomposition(algorithm=algorithm, output_dimension=k, print_info=False)
            seconds = time.perf_counter() - t0
            factors = np.asarray(s.learning_results.factors)[:, :k].T
            note = "uncentred SVD, client threads" if algorithm == "SVD" else "client threads"
        else:
            from sklearn.decomposition import IncrementalPCA

            x = feature_matrix(scan)
            model = IncrementalPCA(n_components=k)
            t0 = time.perf_counter()
            for block in x.to_delayed().ravel():  # the serial client-side loop being compared
                model.partial_fit(block.compute())
            seconds = time.perf_counter() - t0
            factors = model.components_
            note = "client loop over blocks"
    return Row(method, seconds, gb / seconds, peak_bytes() / 1e9, _angle(factors, ref),
               where="client", note=note)


def write_json(result: PCABench, path: Path) -> None:
    path.write_text(json.dumps(result.json_summary(), indent=2))

