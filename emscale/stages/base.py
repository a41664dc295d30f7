"""The stage protocol: what one module declares to be a stage of the pipeline.

A stage is a name, a configuration section (the workflow file's section of the same name, which
the stage's library class takes too), the stages it reads, the variables it writes (names, dims,
meaning: the results-store contract, ``docs/stores.md`` is generated from them) and one
function, ``build(context)``, that makes its outputs (an ``xr.Dataset``, lazy where it is large)
from the datasets of the stages it reads. A build may fit something first (a reduction on the
cluster, a training run); it never writes, creates clusters, reads config files or prints: the
runner does that once for every stage (cache keys, resume, atomic writes, provenance, progress,
logging).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import xarray as xr

from emscale.config import Section
from emscale.errors import ConfigError


@dataclass(frozen=True)
class Output:
    """One variable of a stage group."""

    dims: tuple[str, ...]
    meaning: str
    units: str = ""          # "" when dimensionless or the signal's own units
    when: str = ""           # "" when always written, else the setting that adds it


@dataclass(frozen=True)
class Stage:
    name: str                                  # the results-store group and ``--force`` name
    config: type[Section]                      # its workflow section (key: ``name``)
    reads: tuple[str, ...]                     # stages it reads (``scan``: the input scan)
    build: Callable[["Context"], xr.Dataset]
    outputs: Mapping[str, Output]
    about: str                                 # one line: what the stage does
    attrs: Mapping[str, str] = field(default_factory=dict)  # attrs it writes: name -> meaning
    uses_normal: bool = False                  # its result depends on where normal data come from
    accelerated: bool = False                  # runs the model: on GPU workers when there are any
    finalize: Callable[[xr.Dataset], dict] | None = None  # attrs from the written data
    # the written group as its readers see it (e.g. with variables recomputed lazily)
    reopen: Callable[[xr.Dataset], xr.Dataset] | None = None
    # the library class or function that takes the section's fields as keyword parameters
    # (same names, same defaults), and the fields it does not take, with where they go instead
    library: Callable | None = None
    not_in_library: Mapping[str, str] = field(default_factory=dict)


@dataclass
class NormalData:
    """Where the model learns what is normal: a declared ``region`` (y0, y1, x0, x1) of the scan,
    a ``reference`` scan (its ``preprocess`` stage, and its ``encode`` stage with this run's
    model), or, with neither, the scan itself. The runner provides the reference's stages
    (through this same registry, cached like any stage); a stage run alone has no reference."""

    region: tuple[int, int, int, int] | None = None
    reference: Path | None = None
    key: str = ""                              # enters the cache key of stages that use it
    training_features: Callable[[], xr.Dataset] | None = None  # the preprocess stage to train on
    encoded: Callable[[], xr.Dataset] | None = None   # the reference scan, encoded

    def reference_encoded(self) -> xr.Dataset:
        if self.encoded is None:
            raise ConfigError("anomaly.reference: no reference scan is available to this stage")
        return self.encoded()


@dataclass
class Context:
    """What a stage's ``build`` gets."""

    stage: Stage
    config: Section
    inputs: Mapping[str, xr.Dataset]
    seed: int = 0
    key: str = ""                              # its cache key (checkpoints are kept under it)
    workdir: Path | None = None                # the run's output directory
    normal: NormalData = field(default_factory=NormalData)
    note: Callable[[str], None] = lambda message: None  # a line the runner shows the user
    progress: bool = False

    def input(self, name: str) -> xr.Dataset:
        if name not in self.inputs or self.inputs[name] is None:
            raise ConfigError(f"{self.stage.name}: needs the {name!r} stage's outputs")
        return self.inputs[name]


SIGNAL = "<signal>"  # in a declaration: the scan's signal dims (energy, or ky kx), after crop/bin


def dims_match(dims: tuple[str, ...], declared: tuple[str, ...]) -> bool:
    if SIGNAL not in declared:
        return dims == declared
    i = declared.index(SIGNAL)
    head, tail = declared[:i], declared[i + 1:]
    n = len(dims) - len(head) - len(tail)
    return n in (1, 2) and dims[:i] == head and dims[len(dims) - len(tail):] == tail


def check_outputs(stage: Stage, ds: xr.Dataset) -> None:
    """The built dataset against the stage's declaration: every variable it writes is declared
    with these dims, and every variable declared as always written is there."""
    for name, var in ds.data_vars.items():
        out = stage.outputs.get(str(name))
        if out is None:
            raise ConfigError(f"{stage.name}: writes {name!r}, which its outputs do not declare")
        if not dims_match(tuple(var.dims), out.dims):
            raise ConfigError(f"{stage.name}: {name!r} has dims {tuple(var.dims)}, declared "
                              f"{out.dims}")
    missing = [n for n, out in stage.outputs.items() if not out.when and n not in ds.data_vars]
    if missing:
        raise ConfigError(f"{stage.name}: did not build {missing}")


def described(stage: Stage, ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with each variable's declared meaning (``description``) and units (``units``,
    where it has some) in its attrs: what xarray, HyperSpy and ``emscale export`` show."""
    ds = ds.copy()
    for name, var in ds.data_vars.items():
        out = stage.outputs.get(str(name))
        if out is not None:
            var.attrs.setdefault("description", out.meaning)
            if out.units:
                var.attrs.setdefault("units", out.units)
    return ds


def run_stage(stage: Stage, inputs: Mapping[str, xr.Dataset], config: Section | None = None, *,
              seed: int = 0, **context: Any) -> xr.Dataset:
    """Build one stage's outputs outside the runner (nothing is written): the library's way to
    run a stage of the registry on datasets at hand."""
    config = stage.config() if config is None else config
    ds = stage.build(Context(stage=stage, config=config, inputs=inputs, seed=seed, **context))
    check_outputs(stage, ds)
    return ds
