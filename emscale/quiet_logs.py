"""Logging filters for what distributed and asyncio print about failures emscale reports itself
(one line naming what failed): pages of a task's traceback on its worker, and the noise of
cancelled work after a Ctrl-C. Kept with ``-v``/``--debug``."""

from __future__ import annotations

import logging


class DropComputeFailed(logging.Filter):
    """A worker's "Compute Failed" page (task, exception, traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


class DropAfterCancel(logging.Filter):
    """Records that only say work was cancelled (a Ctrl-C, a failed stage's other tasks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        exc = record.exc_info[1] if record.exc_info else None
        return not (type(exc).__name__ == "AllExit" or "exception=AllExit()" in text
                    or (text.startswith("Async instruction for") and "CancelledError" in text))


