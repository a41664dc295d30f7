"""Dask clusters for emscale's stages. Today: the embedded LocalCluster (the default everywhere).

Worker processes get two environment settings that measurably matter for chunked array work
(DESIGN.md section 6, ``emscale bench pca`` reports them):

- distributed's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed memory goes back to the
  OS at once; with 16-64 MiB chunks that makes every chunk allocation page-fault afresh (the
  LocalCluster read floor was 39 % slower). emscale raises it to 256 MiB: memory still goes back,
  a few chunks' worth later.
- ``OPENBLAS_CORETYPE``: when the environment pins an older kernel set (``Haswell``) on a CPU with
  AVX-512, workers get ``SkylakeX`` kernels (float32 GEMM 1.8x faster here) unless
  ``keep_blas_coretype`` is set. It is never changed on CPUs without AVX-512.
"""

from __future__ import annotations

import logging
import os

import dask

log = logging.getLogger(__name__)

MALLOC_TRIM_THRESHOLD = str(256 << 20)


def cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any("avx512f" in line for line in f if line.startswith("flags"))
    except OSError:
        return False


def worker_environment(keep_blas_coretype: bool = False) -> dict[str, str]:
    env = {"MALLOC_TRIM_THRESHOLD_": MALLOC_TRIM_THRESHOLD}
    pinned = os.environ.get("OPENBLAS_CORETYPE")
    if not keep_blas_coretype and pinned and pinned.lower() in ("haswell", "zen", "sandybridge") \
            and cpu_has_avx512():
        env["OPENBLAS_CORETYPE"] = "SkylakeX"
    return env


def local_cluster(n_workers: int = 2, threads_per_worker: int = 1, memory_limit: str = "4GiB",
                  dashboard_address: str | None = ":8787", keep_blas_coretype: bool = False):
    """A LocalCluster of worker processes with emscale's worker environment."""
    from distributed import LocalCluster

    env = worker_environment(keep_blas_coretype)
    # the nanny lets an existing environment variable win over its pre-spawn config, so the
    # values are also set in this process while the workers are spawned (then restored)
    saved = {k: os.environ.get(k) for k in env}
    try:
        os.environ.update(env)
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in env.items()}):
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                   processes=True, memory_limit=memory_limit,
                                   dashboard_address=dashboard_address)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    log.info("LocalCluster: %d workers x %d threads, %s each, environment %s, dashboard %s",
             n_workers, threads_per_worker, memory_limit, env, cluster.dashboard_link)
    return cluster
