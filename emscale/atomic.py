"""Atomic output directories: write under a temporary name, rename when complete.

A crash (or an error half-way) leaves either the complete output or nothing at the final path,
never a half-written store that looks finished. Temporary names start with the final name and a
``.partial-`` suffix in the same directory so that the rename is atomic (same file system) and a
leftover from a killed process is easy to recognise and remove.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from emscale.errors import OutputExistsError

log = logging.getLogger(__name__)

PARTIAL_MARK = ".partial-"


def check_output_free(path: str | os.PathLike, overwrite: bool = False,
                      remedy: str = "choose another path or remove it") -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} exists already ({remedy})")
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False, *,
                     suffix: str | None = None, keep_on_error: bool = False) -> Iterator[Path]:
    """Yield a temporary directory path; on success move it to ``path``, on error remove it.

    ``suffix`` fixes the temporary name (``NAME.partial-SUFFIX``) and ``keep_on_error`` keeps it
    after an error, so that a later attempt can resume what it holds.
    """
    final = check_output_free(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}{PARTIAL_MARK}{suffix or uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if not overwrite:  # appeared while we were writing
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputExistsError(f"output {final} appeared while writing; kept the other one")
        old = final.with_name(f"{final.name}{PARTIAL_MARK}old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    log.debug("committed %s", final)
