"""A terminal progress bar for a dask computation: distributed's when a client is active (the
tasks run on the cluster), else tqdm's callback for the local schedulers."""

from __future__ import annotations

import contextlib
import sys


def compute(*collections, description: str = "", enabled: bool | None = None):
    """``dask.compute`` with a progress bar on stderr (``enabled`` None: when it is a terminal)."""
    import dask

    show = sys.stderr.isatty() if enabled is None else enabled
    try:
        from distributed import get_client

        client = get_client()
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
