"""The pipeline's stages, in order: one module each, one registry that the runner, the benchmarks
and the tests share. Adding a stage is one module (a ``Stage`` named ``STAGE``) and one line here.
"""

from __future__ import annotations

from typing import Iterator

from emscale.stages.base import (
    Context,
    NormalData,
    Output,
    Stage,
    check_outputs,
    described,
    run_stage,
)


class Registry:
    """Stages in the order they run; each reads only the scan and stages before it."""

    def __init__(self, stages: list[Stage]):
        seen = {"scan"}
        for stage in stages:
            unknown = [r for r in stage.reads if r not in seen]
            if unknown:
                raise ValueError(f"stage {stage.name!r} reads {unknown}, not an earlier stage")
            if stage.name in seen:
                raise ValueError(f"stage {stage.name!r} is registered twice")
            seen.add(stage.name)
        self.stages = list(stages)

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __getitem__(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def get(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def with_stage(self, stage: Stage, after: str | None = None) -> "Registry":
        """A new registry with ``stage`` added after ``after`` (default: at the end)."""
        stages = list(self.stages)
        at = len(stages) if after is None else self.names.index(after) + 1
        return Registry(stages[:at] + [stage] + stages[at:])


def _default() -> Registry:
    from emscale.stages import anomaly, cluster, encode, pca, preprocess, train

    return Registry([preprocess.STAGE, pca.STAGE, train.STAGE, encode.STAGE, anomaly.STAGE,
                     cluster.STAGE])


REGISTRY = _default()

__all__ = ["REGISTRY", "Context", "NormalData", "Output", "Registry", "Stage", "check_outputs",
           "described", "run_stage"]
