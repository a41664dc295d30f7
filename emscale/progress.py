"""A terminal progress bar for dask computations run on the local (threaded) scheduler."""

from __future__ import annotations

import sys

from dask.callbacks import Callback
from tqdm.auto import tqdm


class progress_bar(Callback):
    """``with progress_bar(): dask.compute(...)`` shows finished/total tasks on stderr."""

    def __init__(self, description: str = "", enabled: bool | None = None):
        super().__init__()
        self.description = description
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None

    def _start_state(self, dsk, state):
        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._bar = tqdm(total=total, desc=self.description, unit="task", disable=not self.enabled,
                         file=sys.stderr, leave=False)

    def _posttask(self, key, result, dsk, state, worker_id):
        if self._bar is not None:
            self._bar.update(1)

    def _finish(self, dsk, state, errored):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def compute(*collections, description: str = "", enabled: bool | None = None):
    """``dask.compute`` with a progress bar on stderr: distributed's when a client is active
    (the tasks run on the cluster), else the local scheduler's callback above."""
    import dask

    show = sys.stderr.isatty() if enabled is None else enabled
    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        client = None
    if client is None:
        with progress_bar(description, enabled=show):
            return dask.compute(*collections)
    futures = client.compute(list(collections))
    if show:
        from distributed import progress

        print(description, file=sys.stderr)
        progress(futures, notebook=False)
    return tuple(client.gather(futures))
