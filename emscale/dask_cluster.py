"""Dask clusters (where the stages run; the clustering *stage* is ``emscale.stages.cluster``) for emscale's stages: the embedded LocalCluster (the default everywhere), and
the cluster files of ``emscale run --cluster`` (local, Slurm or PBS through dask-jobqueue, or an
existing scheduler).

Worker processes get two environment settings that measurably matter for chunked array work
(DESIGN.md section 6, ``emscale bench pca`` reports them):

- distributed's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed memory goes back to the
  OS at once; with 16-64 MiB chunks that makes every chunk allocation page-fault afresh (the
  LocalCluster read floor was 39 % slower). glibc also serves every allocation over 32 MiB by a
  fresh ``mmap``, faulted in page by page and unmapped on free: a 64 MiB chunk and each array made
  from it. emscale sets the mmap threshold to 512 MiB and the trim threshold to 1 GiB, so chunk-
  sized arrays reuse the heap's pages: on the 1 GB EELS run (``emscale bench scale``) pca 4.7 ->
  4.0 s, encode 5.5 -> 4.0 s, cluster 20.1 -> 15.4 s, at the price of a worker keeping its
  high-water mark (peak 0.78 -> 1.33 GB; it depends on the chunk size, not the scan's).
- ``OPENBLAS_CORETYPE``: when the environment pins an older kernel set (``Haswell``) on a CPU with
  AVX-512, workers get ``SkylakeX`` kernels (float32 GEMM 1.8x faster here) unless
  ``keep_blas_coretype`` is set. It is never changed on CPUs without AVX-512.
"""

from __future__ import annotations

import logging
import os
import re

import dask
from typing import Any

log = logging.getLogger(__name__)

MALLOC_TRIM_THRESHOLD = str(1 << 30)
MALLOC_MMAP_THRESHOLD = str(512 << 20)


def keep_freed_chunks() -> None:
    """The worker processes' malloc settings (module docstring) in this process, for chunked
    work that runs here (ingest's local threads: a 4 GB ingest 4.3 -> 3.5 s without hashing):
    chunk-sized arrays then reuse freed heap pages instead of faulting in fresh ones. The process
    keeps its high-water mark. A no-op where the C library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(MALLOC_MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
        libc.mallopt(-1, int(MALLOC_TRIM_THRESHOLD))  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def give_back_freed_memory() -> int:
    """``malloc_trim(0)``: the heap this process freed given back to the system (the workers
    keep freed pages, above; after the training, whose batches and model a worker held, the
    next stages' chunks had started from its high-water mark). 1 where memory was released;
    0 where nothing was, or the C library is not glibc."""
    import ctypes

    try:
        return int(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return 0


def cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any("avx512f" in line for line in f if line.startswith("flags"))
    except OSError:
        return False


def worker_environment(keep_blas_coretype: bool = False) -> dict[str, str]:
    env = {"MALLOC_TRIM_THRESHOLD_": MALLOC_TRIM_THRESHOLD,
           "MALLOC_MMAP_THRESHOLD_": MALLOC_MMAP_THRESHOLD}
    pinned = os.environ.get("OPENBLAS_CORETYPE")
    if not keep_blas_coretype and pinned and pinned.lower() in ("haswell", "zen", "sandybridge") \
            and cpu_has_avx512():
        env["OPENBLAS_CORETYPE"] = "SkylakeX"
    return env


def dashboard_bind(address: str | None) -> str | None:
    """A dashboard address as given, or on the loopback where it names no host: distributed
    would listen on every interface for ":8787" (while printing a 127.0.0.1 link), which on a
    shared login node shows the run to anyone who can reach the machine. Reach it from another
    host with an SSH tunnel, or name the interface ("0.0.0.0:8787" for all)."""
    if address and address.startswith(":"):
        return "127.0.0.1" + address
    return address


def free_port_or_any(address: str | None) -> str | None:
    """``address``, or the same host on any free port where its port is taken (another run's
    dashboard on 8787): distributed would do the same after a UserWarning on the terminal; the
    address chosen is the one ``emscale run``/``batch`` print."""
    import socket

    if not address or address.rpartition(":")[2] in ("", "0"):
        return address
    host, _, port = address.rpartition(":")
    try:
        with socket.socket() as s:
            s.bind((host or "127.0.0.1", int(port)))
    except (OSError, ValueError):
        log.info("dashboard: %s is taken, any free port instead", address)
        return f"{host}:0"
    return address


class spawned_without_sigint:
    """Processes started inside ignore SIGINT: a Ctrl-C on the terminal reaches every process of
    its group, and local workers that took it each printed a KeyboardInterrupt traceback while
    emscale closed them in order. A child inherits an ignored SIGINT across exec and Python then
    installs no handler of its own. This process ignores Ctrl-C only while the workers start."""

    def __enter__(self):
        import signal
        import threading

        self.saved = None
        if threading.current_thread() is threading.main_thread():
            self.saved = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc):
        import signal

        if self.saved is not None:
            signal.signal(signal.SIGINT, self.saved)
        return False


def local_cluster(n_workers: int = 2, threads_per_worker: int = 1, memory_limit: str = "4GiB",
                  dashboard_address: str | None = ":8787", keep_blas_coretype: bool = False,
                  security=None, gpus: int = 0):
    """A LocalCluster of worker processes with emscale's worker environment."""
    from distributed import LocalCluster

    env = worker_environment(keep_blas_coretype)
    # the nanny lets an existing environment variable win over its pre-spawn config, so the
    # values are also set in this process while the workers are spawned (then restored)
    saved = {k: os.environ.get(k) for k in env}
    try:
        os.environ.update(env)
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in env.items()}):
            # without a dashboard the scheduler still serves /health on an HTTP port: any free
            # one, not 8787 (busy there: a warning on the terminal)
            off = {} if dashboard_address else {"scheduler_kwargs": {"dashboard_address":
                                                                     "127.0.0.1:0"}}
            tls = {} if security is None else {"security": security, "protocol": "tls://"}
            if gpus:
                tls["resources"] = {"GPU": gpus}
            with spawned_without_sigint():
                cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                       processes=True, memory_limit=memory_limit,
                                       dashboard_address=free_port_or_any(
                                           dashboard_bind(dashboard_address)), **off, **tls)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    log.info("LocalCluster: %d workers x %d threads, %s each, environment %s, dashboard %s",
             n_workers, threads_per_worker, memory_limit, env, cluster.dashboard_link)
    return cluster


# ---------------------------------------------------------------------------------------------
# cluster files (``emscale run --cluster FILE``)

CLUSTER_TYPES = ("local", "slurm", "pbs", "address", "slurm-runner")


# what a scheduler option value may hold in a batch script's directive line
SCHEDULER_WORD = re.compile(r"[\w.\-:@+,]+")  # a comma: Slurm's partition lists


def _cluster_schema():
    from typing import Literal, Optional

    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    class ClusterFile(BaseModel):
        """Where the stages run. ``local``: a LocalCluster of worker processes; ``slurm`` /
        ``pbs``: dask-jobqueue, each worker a batch job (``jobs`` fixed, or ``adaptive``
        between ``minimum_jobs`` and ``jobs``); ``address``: an existing scheduler;
        ``slurm-runner``: inside one Slurm allocation (``srun``: task 0 the scheduler, task 1
        emscale, the others ``workers`` workers; dask-jobqueue's SLURMRunner)."""

        model_config = ConfigDict(extra="forbid", frozen=True)
        type: Literal["local", "slurm", "pbs", "address", "slurm-runner"] = "local"
        # local
        workers: int = Field(2, ge=1, description="local: worker processes; slurm-runner: "
                             "worker tasks (the allocation has two more)")
        scheduler_file: str = Field("scheduler-{job_id}.json", description="slurm-runner: on "
                                    "storage every task sees")
        threads: int = Field(1, ge=1, description="threads per worker process")
        memory: str = Field("4GiB", description="memory per worker (local) or per job")
        dashboard_address: Optional[str] = ":8787"
        # slurm / pbs
        cores: int = Field(1, ge=1, description="cores per job")
        processes: int = Field(1, ge=1, description="worker processes per job")
        jobs: int = Field(2, ge=1, description="jobs to start (the maximum when adaptive)")
        adaptive: bool = False
        minimum_jobs: int = Field(0, ge=0)
        walltime: str = "01:00:00"
        queue: Optional[str] = None
        account: Optional[str] = None
        job_extra_directives: list[str] = Field(default_factory=list)
        interface: Optional[str] = None
        log_directory: Optional[str] = None
        python: Optional[str] = None
        # every type
        gpus: int = Field(0, ge=0, description="GPUs per worker (local) or per job (slurm: "
                          "--gres=gpu:N; pbs: add its -l directive): the workers declare a GPU "
                          "resource, and training and encoding run there")
        tls: Optional[str] = Field(None, description="TLS between scheduler, workers and "
                                   "emscale: a directory of ca.pem, cert.pem, key.pem ('emscale "
                                   "tls DIR' makes one), or auto (local: temporary ones)")
        # address
        address: Optional[str] = None
        wait_for_workers: int = Field(1, ge=0, description="workers to wait for before starting")
        timeout: float = Field(300, gt=0, description="seconds to wait for them")

        @field_validator("memory")
        @classmethod
        def _size(cls, value):
            from dask.utils import parse_bytes

            try:
                if parse_bytes(value) <= 0:
                    raise ValueError
            except (ValueError, TypeError):
                raise ValueError(f"{value!r} is not a size (e.g. 4GiB, 512MB)") from None
            return value

        @field_validator("walltime", "queue", "account")
        @classmethod
        def _plain_word(cls, value):
            # these go into #SBATCH/#PBS lines: no spaces, quotes or line breaks
            if value is not None and not SCHEDULER_WORD.fullmatch(value):
                raise ValueError(f"{value!r}: use letters, digits and . _ - : @ + , only")
            return value

        @field_validator("job_extra_directives")
        @classmethod
        def _one_line_each(cls, values):
            for value in values:
                if any(ord(c) < 32 or ord(c) == 127 for c in value):
                    raise ValueError(f"{value!r}: a directive cannot hold a line break or "
                                     "control character")
            return values

        @model_validator(mode="after")
        def _address(self):
            if (self.type == "address") != (self.address is not None):
                raise ValueError("address: give it exactly when type is 'address'")
            if self.tls is not None and self.type == "slurm-runner":
                raise ValueError("tls: not with slurm-runner (dask-jobqueue's SLURMRunner "
                                 "starts its scheduler without certificates)")
            if self.tls == "auto" and self.type != "local":
                raise ValueError("tls: auto (certificates in memory) is for local clusters; "
                                 "give a directory every host sees ('emscale tls DIR')")
            if self.tls is not None and self.address and self.address.startswith("tcp://"):
                raise ValueError(f"address: {self.address} is plain TCP while tls is set: "
                                 "tls://HOST:PORT")
            return self

    return ClusterFile


def load_cluster_file(path):
    """A validated cluster file (YAML); errors name the file and the field."""
    from pydantic import ValidationError

    from emscale.config import load_yaml, validation_message
    from emscale.errors import ConfigError

    data = load_yaml(path, "cluster file")
    try:
        return _cluster_schema().model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_message(exc, model=_cluster_schema())}") from None


def default_cluster_file():
    return _cluster_schema()()


def with_options(cfg, options: dict[str, tuple[str, Any]]):
    """The cluster file ``cfg`` with command-line options applied and checked like the file:
    ``{field: (option, value)}``, a value of None leaving the field as it is; an error names
    the option."""
    from pydantic import ValidationError

    from emscale.config import plain_message
    from emscale.errors import ConfigError

    for name, (option, value) in options.items():
        if value is None:
            continue
        try:
            cfg = _cluster_schema().model_validate({**cfg.model_dump(), name: value})
        except ValidationError as exc:
            message = "; ".join(plain_message(e) for e in exc.errors())
            raise ConfigError(f"{option}: {message}") from None
    return cfg


def check_listening(address: str, timeout: float = 10.0) -> None:
    """Refuse at once a scheduler address where nothing listens (distributed would retry until
    the cluster file's ``timeout``, 300 s by default, to say so)."""
    import socket
    from urllib.parse import urlsplit

    from emscale.errors import ConfigError

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise ConfigError(f"address: {address!r} is not host:port (e.g. tcp://login1:8786)")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except ConnectionRefusedError:
        raise ConfigError(f"address: nothing listens at {address} (connection refused): is the "
                          "scheduler running, and on that port?") from None
    except socket.gaierror as exc:
        raise ConfigError(f"address: {host!r} cannot be resolved ({exc.strerror})") from None
    except OSError:
        pass  # slow or filtered: distributed's own timeout decides


class open_cluster:
    """``with open_cluster(cfg) as (cluster, client):`` the cluster of a cluster file, its
    workers up (jobqueue: ``jobs`` submitted and the first ``wait_for_workers`` running)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.cluster = self.client = None

    def __enter__(self):
        from distributed import Client

        from emscale.tls import security

        cfg = self.cfg
        sec = security(cfg.tls)
        if cfg.type == "local":
            self.cluster = local_cluster(cfg.workers, cfg.threads, cfg.memory,
                                         dashboard_address=cfg.dashboard_address, security=sec,
                                         gpus=cfg.gpus)
            self.client = Client(self.cluster, security=sec)
        elif cfg.type == "address":
            check_listening(cfg.address)
            self.client = _connect(cfg, sec)
        elif cfg.type == "slurm-runner":
            # every task runs this; only task 1 (the client) gets past __enter__, the scheduler
            # and worker tasks serve until the client closes, then exit
            from dask_jobqueue.runner import Role
            from dask_jobqueue.slurm import SLURMRunner

            try:
                self.cluster = SLURMRunner(
                    scheduler_file=cfg.scheduler_file,
                    worker_options={"nthreads": cfg.threads, "memory_limit": cfg.memory})
                self.cluster.__enter__()
            except KeyboardInterrupt:  # how the runner ends a scheduler or worker task
                raise SystemExit(0) from None
            if self.cluster.role != Role.client:
                raise SystemExit(0)
            self.client = Client(self.cluster)
        else:
            self.cluster = _jobqueue_cluster(cfg, sec)
            if cfg.adaptive:
                self.cluster.adapt(minimum_jobs=cfg.minimum_jobs, maximum_jobs=cfg.jobs)
            else:
                self.cluster.scale(jobs=cfg.jobs)
            self.client = Client(self.cluster, security=sec)
        if cfg.type != "address" and dask.config.get("logging.distributed", None) == "warning":
            # a task's failure is raised here, named, in one line; its workers need not print
            # it again as a page of "Compute Failed" (kept with -v); not on someone else's workers
            from emscale.worker_plugins import QuietTaskFailures

            self.client.register_plugin(QuietTaskFailures(), name="emscale-quiet-task-failures")
        if cfg.wait_for_workers:
            n = cfg.workers if cfg.type in ("local", "slurm-runner") else cfg.wait_for_workers
            try:
                self.client.wait_for_workers(n, timeout=cfg.timeout)
            except TimeoutError:  # (distributed's WorkerStartTimeoutError is one)
                from emscale.errors import ConfigError

                have = len(self.client.scheduler_info(n_workers=-1)["workers"])
                where = f" at {cfg.address}" if cfg.type == "address" else ""
                self.__exit__(None, None, None)
                raise ConfigError(f"wait_for_workers: {have} of the {n} workers came up{where} "
                                  f"within timeout: {cfg.timeout:g} s (start more workers, or "
                                  "lower wait_for_workers or raise timeout in the cluster file)"
                                  ) from None
        return self.cluster, self.client

    def __exit__(self, *exc):
        if self.cluster is not None and self.cfg.type == "local":
            stop_local_workers(self.cluster, self.client)
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            if self.cfg.type == "slurm-runner":
                self.cluster.__exit__(*exc)
            else:
                self.cluster.close()
        return False


def _exit_at_once_if_busy(dask_worker) -> bool:
    """(on a worker about to be stopped) With a task still running, the process ends without
    the C++ destructors that would abort under a running torch thread ("terminate called without
    an active exception"): after multiprocessing's own exit (its finalizers unregister the
    semaphores), the interpreter's last step is ``os._exit``."""
    if not getattr(dask_worker, "active_threads", None):
        return False
    import atexit
    import os
    import sys

    def exit_now():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(0)

    atexit.register(exit_now)
    return True


def stop_local_workers(cluster, client=None, timeout: float = 10) -> None:
    """Stop a LocalCluster's worker processes before its scheduler, without waiting for the
    tasks they still run (an interrupted run's training, a failed scan's other tasks): a thread
    cannot be stopped, so distributed's close waited 4 s, then killed the worker ("Worker process
    still alive after 4.0 seconds, killing", then a leaked semaphore warning: numcodecs' lock).
    Every result is written atomically, so an abandoned task loses nothing."""
    import asyncio

    nannies = [n for n in cluster.workers.values() if getattr(n, "process", None) is not None]
    if not nannies:
        return
    if client is not None:
        try:
            client.run(_exit_at_once_if_busy, on_error="return")
        except Exception as exc:
            log.debug("workers' exit: %s", exc)

    async def stop():
        for nanny in nannies:
            nanny.close_gracefully(reason="emscale-exit")  # its worker's exit: no restart
        await asyncio.gather(*(nanny.process.kill(timeout=timeout, executor_wait=False,
                                                  reason="emscale-exit") for nanny in nannies),
                             return_exceptions=True)

    try:
        cluster.sync(stop)
    except Exception as exc:  # distributed's own close still follows
        log.debug("stopping the local workers: %s", exc)


def _connect(cfg, sec):
    """A client of the scheduler at the cluster file's address; a TLS mismatch in one line."""
    from distributed import Client
    from distributed.comm.core import CommClosedError

    from emscale.errors import ConfigError

    try:
        return Client(cfg.address, timeout=cfg.timeout, security=sec)
    except (CommClosedError, OSError) as exc:
        if cfg.tls is not None and "certificate" in str(exc):
            raise ConfigError(f"tls: the scheduler at {cfg.address} refused the certificates in "
                              f"{cfg.tls} (signed by another authority?): use the directory its "
                              "scheduler and workers were started with") from None
        if cfg.tls is None:
            raise ConfigError(f"address: the scheduler at {cfg.address} closed the connection "
                              f"({exc}); if it uses TLS, name its certificates (tls: DIR) and "
                              "its tls:// address in the cluster file") from None
        raise


def _jobqueue_cluster(cfg, security=None):
    import sys

    from dask_jobqueue import PBSCluster, SLURMCluster

    cls = SLURMCluster if cfg.type == "slurm" else PBSCluster
    env = worker_environment()
    kwargs = dict(cores=cfg.cores, processes=cfg.processes,
                  memory=cfg.memory, walltime=cfg.walltime, queue=cfg.queue, account=cfg.account,
                  job_extra_directives=[*cfg.job_extra_directives, *(
                      [f"--gres=gpu:{cfg.gpus}"] if cfg.gpus and cfg.type == "slurm" else [])],
                  interface=cfg.interface,
                  log_directory=cfg.log_directory, python=cfg.python or sys.executable,
                  security=security,
                  worker_extra_args=["--resources", f"GPU={cfg.gpus}"] if cfg.gpus else [],
                  job_script_prologue=[f"export {k}={v}" for k, v in env.items()])
    # (dask-jobqueue's own default is ":8787": every interface)
    kwargs["scheduler_options"] = {"dashboard_address": dashboard_bind(
        cfg.dashboard_address if cfg.dashboard_address is not None else ":0")}
    return cls(**kwargs)


def gpu_workers() -> int:
    """How many workers of the active client declare a ``GPU`` resource (0 without a client)."""
    try:
        from distributed import get_client

        info = get_client().scheduler_info(n_workers=-1)["workers"]
    except (ImportError, ValueError):
        return 0
    return sum(1 for w in info.values() if w.get("resources", {}).get("GPU"))


def worker_hosts() -> dict[str, str]:
    """The host name of each worker of the active client ({} without one), for provenance: on
    a cluster of several hosts, where each part of a run ran."""
    import platform

    try:
        from distributed import get_client

        return get_client().run(platform.node)
    except (ImportError, ValueError):
        return {}


def worker_jobs(client) -> dict[str, str | None]:
    """The batch job of each worker (SLURM_JOB_ID / PBS_JOBID), for provenance."""
    return client.run(lambda: os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID"))
