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

from emscale.errors import ConfigError, OutputExistsError, output_failure

log = logging.getLogger(__name__)

PARTIAL_MARK = ".partial-"


def check_output_free(path: str | os.PathLike, overwrite: bool = False,
                      remedy: str = "choose another path or remove it", *,
                      inputs: tuple = ()) -> Path:
    """Refuse an output that exists (unless ``overwrite``), that ``overwrite`` would replace
    although emscale cannot have written it (anything but a Zarr store), or that is, holds or
    lies inside one of ``inputs``."""
    path = Path(path)
    check_apart(path, inputs)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output {path} exists already ({remedy})")
        target = path.resolve()  # a link to a store (on scratch, say) is a store
        empty = target.is_dir() and not any(target.iterdir())
        if not empty and not (target / "zarr.json").is_file():
            raise OutputExistsError(f"output {path} exists and is not a Zarr store: --overwrite "
                                    "replaces only a store (choose another path)")
    return path


def check_apart(output: str | os.PathLike, inputs, what: str = "output") -> None:
    """Refuse an output that is one of ``inputs``, holds one (replacing it would delete the
    input) or lies inside one (writing it would change the input). Paths are compared resolved,
    so links and ``..`` do not hide an overlap."""
    out = Path(output).resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if out == src:
            raise ConfigError(f"{what} {output}: is the input {source} (it would be overwritten)")
        if src.is_relative_to(out):
            raise ConfigError(f"{what} {output}: holds the input {source} (writing it there "
                              "would replace the input); choose an output outside it")
        if out.is_relative_to(src):
            raise ConfigError(f"{what} {output}: lies inside the input {source} (writing it "
                              "would change the input); choose an output outside it")


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
    except BaseException as exc:
        if not keep_on_error:
            shutil.rmtree(tmp, ignore_errors=True)
        failure = output_failure(exc, final, f"the chunks written so far are kept in {tmp.name}: "
                                 "free space and rerun to resume" if keep_on_error else "")
        if failure is not None:
            raise failure from exc
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
