"""Plugins emscale installs on the workers of the clusters it starts."""

from __future__ import annotations

import logging

from distributed.diagnostics.plugin import WorkerPlugin


class _DropComputeFailed(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


class QuietTaskFailures(WorkerPlugin):
    """The worker's log leaves out its "Compute Failed" records (a page each: task, exception,
    traceback): the exception reaches the client, which says in one line what failed."""

    idempotent = True

    def setup(self, worker) -> None:
        logger = logging.getLogger("distributed.worker")
        if not any(isinstance(f, _DropComputeFailed) for f in logger.filters):
            logger.addFilter(_DropComputeFailed())
