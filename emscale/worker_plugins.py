"""Plugins emscale installs on the workers of the clusters it starts."""

from __future__ import annotations

import logging

from distributed.diagnostics.plugin import WorkerPlugin

from emscale.quiet_logs import DropAfterCancel, DropComputeFailed


class QuietTaskFailures(WorkerPlugin):
    """The worker's log leaves out its "Compute Failed" records (a page each: task, exception,
    traceback): the exception reaches the client, which says in one line what failed."""

    idempotent = True

    def setup(self, worker) -> None:
        for name, kind in (("distributed.worker", DropComputeFailed),
                           ("distributed.worker.state_machine", DropAfterCancel)):
            logger = logging.getLogger(name)
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())
