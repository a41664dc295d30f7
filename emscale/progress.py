"""A terminal progress bar for a dask computation: distributed's when a client is active (the
tasks run on the cluster), else tqdm's callback for the local schedulers."""

from __future__ import annotations

import contextlib
import sys


LOCAL_SCHEDULERS = ("threads", "threading", "sync", "synchronous", "single-threaded",
                    "processes", "multiprocessing")


def compute(*collections, description: str = "", enabled: bool | None = None):
    """``dask.compute`` with a progress bar on stderr (``enabled`` None: when it is a terminal)."""
    import dask
    from dask.delayed import Delayed

    # dask 2026.8 returns the results of a mix of Delayed and other collections grouped by type
    # (compute(delayed, array, delayed) gives delayed, delayed, array): as Delayed objects they
    # come back in order. Each collection is still optimised apart, so a task two of them share
    # runs once per collection: where that matters, pass one graph (``store.write_scan``)
    if any(isinstance(c, Delayed) for c in collections):
        collections = tuple(c if isinstance(c, Delayed) else dask.delayed(c) for c in collections)
    show = sys.stderr.isatty() if enabled is None else enabled
    try:
        from distributed import get_client

        # a local scheduler set by the caller (ingest's threads) wins over a default client
        client = None if dask.config.get("scheduler", None) in LOCAL_SCHEDULERS else get_client()
    except (ImportError, ValueError):
        client = None
    if client is None:
        with _own_thread_pool() as kwargs:
            if not show:
                return dask.compute(*collections, **kwargs)
            from tqdm.dask import TqdmCallback

            with TqdmCallback(desc=description, unit="task", leave=False, file=sys.stderr):
                return dask.compute(*collections, **kwargs)
    futures = client.compute(list(collections))
    try:
        if show:
            from distributed import progress

            print(description, file=sys.stderr)
            progress(futures, notebook=False)
        return tuple(client.gather(futures))
    except Exception:  # (not after Ctrl-C: the user wants out, and what was kept resumes)
        client.cancel(futures)
        _wait_until_idle(client)
        raise


# When a task fails, dask raises at once while the tasks already running go on: a writer
# still running would write into the temporary directory that the caller removes on the error
# (ingest of a damaged store left ``OUT.partial-*`` behind). So a failed computation returns
# only once the tasks it started have ended.

@contextlib.contextmanager
def _own_thread_pool():
    """The threaded scheduler's keyword arguments with a pool of its own, shut down (waiting
    for running tasks) when the computation ends; none for the other local schedulers."""
    import dask

    if dask.config.get("scheduler", None) not in (None, "threads", "threading"):
        yield {}
        return
    import os
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(dask.config.get("num_workers", None) or os.cpu_count() or 1)
    interrupted = False
    try:
        yield {"pool": pool}
    except KeyboardInterrupt:  # the user wants out: running tasks are not waited for
        interrupted = True
        raise
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)


def _wait_until_idle(client, timeout: float = 60.0) -> None:
    """Wait (at most ``timeout`` s) until no worker executes a task: after a cancel, the tasks
    already running finish on their workers."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            busy = client.run(lambda dask_worker: len(dask_worker.state.executing))
        except Exception:  # workers gone, or the client closing: nothing left to wait for
            return
        if not any(busy.values()):
            return
        time.sleep(0.1)


@contextlib.contextmanager
def repeating(fn, every: float, name: str = "progress", final: bool = False):
    """Call ``fn()`` every ``every`` seconds in a background thread while the block runs (and
    once more at its end with ``final``): progress lines for logs without a terminal."""
    import threading

    stop = threading.Event()

    def loop():
        while not stop.wait(every):
            fn()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if final:
            fn()
