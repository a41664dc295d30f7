"""Errors that users see as one line: each names the file, chunk or config field at fault."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# what makes an output unwritable, as opposed to a bug or a bad input
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class EmscaleError(Exception):
    """Base class: the command line prints these as one line, without a traceback."""


class InputError(EmscaleError):
    """A raw file or store cannot be read, or its content breaks the input contract."""


class StoreError(InputError):
    """A Zarr store does not follow the scan-store or results-store contract."""


class ConfigError(EmscaleError):
    """A configuration value (CLI option or workflow field) is invalid."""


class OutputExistsError(EmscaleError):
    """The output path exists already; emscale never overwrites without being asked."""


class OutputError(EmscaleError):
    """The output cannot be written: disk full, quota, read-only or no permission."""


def output_failure(exc: BaseException, output: str | os.PathLike,
                   kept: str = "") -> OutputError | None:
    """An ``OutputError`` naming ``output`` for an ``OSError`` that says the disk is full or
    not writable (raised here or on a worker), with the free space there; None for any other
    error. ``kept`` says what was kept for a rerun."""
    if not isinstance(exc, OSError) or exc.errno not in NO_ROOM:
        return None
    where = Path(output)
    if exc.errno in (errno.EACCES, errno.EPERM):
        # a permission error is the output's only where it names a file of the output (or of
        # its temporary sibling NAME.partial-...): an input that cannot be read is not
        mine = str(where.resolve())
        if not exc.filename or not str(Path(str(exc.filename)).resolve()).startswith(mine):
            return None
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"; {shutil.disk_usage(probe).free / 1e6:.0f} MB free there"
    except OSError:
        free = ""
    name = f" ({exc.filename})" if exc.filename else ""
    return OutputError(f"output {where}: cannot write{name}: {os.strerror(exc.errno)}{free}; "
                       + (kept or "nothing was written there"))
