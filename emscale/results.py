"""The results store (DESIGN.md section 3): one Zarr v3 store per scan, one group per stage.

Each stage group is written as a complete Zarr v3 store under a temporary name inside the results
directory (``NAME.partial-XXXX``) and renamed into place when complete, so a crash never leaves a
half-written stage that looks complete: a stage group exists only once all its chunks and
attributes are on disk. Stage groups are read back with xarray (``open_stage``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import dask
import numpy as np
import xarray as xr
import zarr

from emscale.atomic import PARTIAL_MARK, atomic_directory
from emscale.errors import StoreError
from emscale.store import default_compressor

log = logging.getLogger(__name__)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ResultsStore:
    """A results directory: a Zarr v3 root group whose child groups are the stages."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def create(self, attrs: dict[str, Any] | None = None) -> "ResultsStore":
        if self.path.exists() and not (self.path / "zarr.json").exists():
            raise StoreError(f"{self.path}: exists and is not a results store")
        root = zarr.open_group(str(self.path), mode="a", zarr_format=3)
        if attrs:
            root.attrs.update(attrs)
        self._remove_leftovers()
        return self

    def _remove_leftovers(self) -> None:
        for p in self.path.glob(f"*{PARTIAL_MARK}*"):
            log.warning("removing %s left by an interrupted run", p)
            shutil.rmtree(p, ignore_errors=True)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(zarr.open_group(str(self.path), mode="r").attrs)

    def stages(self) -> list[str]:
        if not self.path.exists():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if (p / "zarr.json").exists() and PARTIAL_MARK not in p.name)

    def has_stage(self, name: str) -> bool:
        return (self.path / name / "zarr.json").exists()

    def write_stage(
        self,
        name: str,
        ds: xr.Dataset,
        *,
        overwrite: bool = False,
        finalize: Callable[[xr.Dataset], dict[str, Any]] | None = None,
        progress: bool = False,
    ) -> xr.Dataset:
        """Compute ``ds`` chunk by chunk into the stage group ``name``, atomically.

        ``finalize(written)`` may return attributes to add once the data are on disk (totals read
        back from small written maps, for instance) or raise to reject the stage. Returns the stage as read
        back from disk (lazy).
        """
        if not (self.path / "zarr.json").exists():
            self.create()
        started = _now()
        with atomic_directory(self.path / name, overwrite=overwrite) as tmp:
            delayed = ds.to_zarr(str(tmp), mode="w-", zarr_format=3, consolidated=False,
                                 encoding=_encoding(ds), compute=False)
            if progress:
                from emscale.progress import compute

                compute(delayed, description=name)
            else:
                dask.compute(delayed)
            group = zarr.open_group(str(tmp), mode="a", zarr_format=3)
            extra = finalize(_open(tmp)) if finalize else {}
            group.attrs.update({**(extra or {}), "stage": name, "started": started, "finished": _now()})
        log.info("wrote stage %s of %s", name, self.path)
        return self.open_stage(name)

    def stage_attrs(self, name: str) -> dict[str, Any]:
        return dict(zarr.open_group(str(self.path / name), mode="r", zarr_format=3).attrs)

    def update_attrs(self, attrs: dict[str, Any], stage: str | None = None) -> None:
        """Add ``attrs`` to the root group, or to a stage group (e.g. its cache key)."""
        where = self.path if stage is None else self.path / stage
        zarr.open_group(str(where), mode="a", zarr_format=3).attrs.update(attrs)

    def open_stage(self, name: str) -> xr.Dataset:
        if not self.has_stage(name):
            raise StoreError(f"{self.path}: no stage {name!r} (stages: {self.stages()})")
        return _open(self.path / name)


def _open(path: Path) -> xr.Dataset:
    return xr.open_zarr(str(path), consolidated=False, chunks={}, zarr_format=3)


def _encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    enc = {}
    for name, var in ds.data_vars.items():
        if var.chunks is not None:
            chunks = tuple(c[0] for c in var.chunks)
        else:
            chunks = var.shape
        enc[name] = {"chunks": tuple(max(1, c) for c in chunks),
                     "compressors": (default_compressor(np.dtype(var.dtype).itemsize),)}
    return enc
