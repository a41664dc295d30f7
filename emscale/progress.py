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
        if not show:
            return dask.compute(*collections)
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc=description, unit="task", leave=False, file=sys.stderr):
            return dask.compute(*collections)
    futures = client.compute(list(collections))
    if show:
        from distributed import progress

        print(description, file=sys.stderr)
        progress(futures, notebook=False)
    return tuple(client.gather(futures))


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
