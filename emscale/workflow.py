"""The workflow file: one YAML document that says what ``emscale run`` does, validated by pydantic.

Unknown keys and bad values are refused with the field's path (``train.latent_dim: ...``). Every
section has defaults, so a workflow can be as short as an input. Besides the run's own fields
(input or synth, output, seed, chunk size), there is one section per stage of the registry, named
after the stage, of the type the stage's module declares (``emscale.stages``):

```yaml
input: scan.zarr            # a scan store, or a raw file to ingest, or:
synth: {kind: eels, shape: [128, 128], channels: 1024, anomaly: true, seed: 42}
output: results/            # the results directory (results.zarr, report/, emscale.log)
seed: 0                     # the default seed of every stage
preprocess: {steps: [{step: normalize, method: sum}]}
pca: {n_components: 16, solver: gram}
train: {latent_dim: 4, epochs: 30}
encode: {denoised: false, error: auto}
anomaly: {calibration: robust, false_alarm_rate: 0.01}   # or normal_region / reference
cluster: {method: kmeans, n_clusters: auto, k_range: [2, 8]}
```
"""

from __future__ import annotations

import functools
import hashlib
import json
import typing
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from emscale.config import Section, load_yaml, validation_message
from emscale.errors import ConfigError
from emscale.stages import REGISTRY, Registry


class SynthConfig(Section):
    """A generated scan instead of an input file (demos, tests, benchmarks)."""

    kind: Literal["eels", "eds", "4dstem"] = Field("eels", description=
        'what to generate: an EELS or EDS spectrum image, or a 4D-STEM scan')
    shape: tuple[int, int] = Field((128, 128), description='scan size in pixels (y, x)')
    channels: int = Field(1024, ge=64, description="energy channels (eels, eds)")
    pattern: tuple[int, int] = Field((64, 64), description='diffraction pattern size (4dstem)')
    anomaly: bool = Field(True, description=
        'add anomalous regions (labelled -1 in the ground truth)')
    seed: int = Field(42, ge=0, description="seed of the generated scan")
    store_clean: bool = Field(False, description=
        'keep the float32 clean signal in the scan store (about 3x the counts); false: it is '
        'regenerated from the generator when read')


class WorkflowBase(Section):
    """The run's own fields; ``workflow_model`` adds one section per stage."""

    input: Optional[Path] = Field(None, description=
        'a scan store, or a raw file to ingest (or give synth)')
    synth: Optional[SynthConfig] = Field(None, description=
        'a generated scan instead of an input file')
    output: Path = Field(Path("emscale-output"), description=
        'the results directory (results.zarr, report/, emscale.log)')
    seed: int = Field(0, ge=0, le=2**32 - 1, description='the seed of every random draw')
    chunk_mib: float = Field(64.0, gt=0, le=1024, description=(
        "navigation block size, in MiB of float32, of the scan the run writes (generated or "
        "ingested): a worker holds a few blocks at a time, and a killed stage redoes only its "
        "unfinished blocks"))

    @model_validator(mode="after")
    def _one_input(self):
        if (self.input is None) == (self.synth is None):
            raise ValueError("give exactly one of input (a scan store or raw file) and synth")
        return self

    @model_validator(mode="after")
    def _pca_covers_latent(self):
        train, pca = getattr(self, "train", None), getattr(self, "pca", None)
        if train is not None and pca is not None and train.latent_dim > pca.n_components:
            raise ValueError(f"train.latent_dim: {train.latent_dim} is more than "
                             f"pca.n_components ({pca.n_components}); PCA is compared with the "
                             "autoencoder at the same k: lower train.latent_dim or raise "
                             "pca.n_components")
        return self

    @field_validator("output")
    @classmethod
    def _not_empty(cls, v: Path) -> Path:
        if str(v).strip() in ("", "."):
            raise ValueError("must name a directory for the results")
        return v

    def section(self, name: str) -> Section:
        """A stage's section."""
        return getattr(self, name)

    def section_hash(self, *names: str) -> str:
        """A short hash of the named sections (and the seed)."""
        data = self.model_dump(mode="json")
        blob = json.dumps([data.get(n) for n in names] + [self.seed], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def workflow_model(registry: Registry = REGISTRY) -> type[WorkflowBase]:
    """The workflow schema of a registry: the run's fields plus each stage's section."""
    sections = {stage.name: (stage.config, Field(default_factory=stage.config,
                                                  description=stage.about))
                for stage in registry}
    return create_model("Workflow", __base__=WorkflowBase, **sections)


Workflow = workflow_model(REGISTRY)


def load_workflow(path: str | Path, registry: Registry = REGISTRY, **overrides) -> WorkflowBase:
    """Read and validate a workflow file; ``overrides`` (command-line values) win over it."""
    data = load_yaml(path, "workflow")
    for key, value in overrides.items():
        if value is not None:
            data[key] = str(value) if isinstance(value, Path) else value
    if overrides.get("input") is not None:
        data.pop("synth", None)
    return validate_workflow(data, source=str(path), registry=registry)


def validate_workflow(data: dict, source: str = "workflow",
                      registry: Registry = REGISTRY) -> WorkflowBase:
    model = workflow_model(registry)
    try:
        wf = model.model_validate(data)
    except ValidationError as exc:
        message = validation_message(exc, model=model)
        chain = _chain_errors(data, registry)  # all of the file's errors at once
        raise ConfigError(f"{source}: {'; '.join(filter(None, [message, chain]))}") from None
    from emscale.stages.preprocess import Preprocessor

    if "preprocess" in registry.names:
        kind = None if wf.synth is None else {"eels": "spectrum", "eds": "spectrum",
                                               "4dstem": "diffraction"}[wf.synth.kind]
        pre = wf.preprocess
        try:  # the chain's step names, parameters and choices, before any data are read
            Preprocessor(list(pre.steps), pre.nonfinite, pre.negative).check(kind)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return wf


def _chain_errors(data: dict, registry: Registry) -> str:
    """The preprocessing chain's errors in a workflow that failed validation elsewhere (its
    steps are checked only once the section is valid), so that one run names them all."""
    from emscale.stages.preprocess import Preprocessor

    pre = data.get("preprocess") if isinstance(data, dict) else None
    if "preprocess" not in registry.names or not isinstance(pre, dict):
        return ""
    steps = pre.get("steps")
    if not isinstance(steps, list):
        return ""
    try:
        Preprocessor(steps).check(None)
    except ConfigError as exc:
        return str(exc)
    except Exception:  # a section so broken that pydantic's errors say enough
        return ""
    return ""


def defaults_yaml(registry: Registry = REGISTRY) -> str:
    """Every workflow field with its default and description, as a commented YAML document
    (``emscale defaults``)."""
    return "\n".join(_describe(workflow_model(registry), 0)) + "\n"


def _choices(annotation) -> list:
    """The values of a ``Literal`` field (or of an ``Optional`` one); none for other types."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        return list(typing.get_args(args[0]))
    return []


def _describe(model: type[BaseModel], depth: int) -> list[str]:
    lines, pad = [], "  " * depth
    for name, field in model.model_fields.items():
        kind = next((t for t in (field.annotation, *typing.get_args(field.annotation))
                     if isinstance(t, type) and issubclass(t, Section)), None)
        about = f"  # {field.description}" if field.description else ""
        choices = _choices(field.annotation)
        if choices and about:
            about += f" (one of: {', '.join(map(str, choices))})"
        default = field.get_default(call_default_factory=True)
        if kind is not None and default is not None:
            lines.append(f"{pad}{name}:{about}")
            lines.extend(_describe(kind, depth + 1))
            continue
        if kind is not None:  # an optional section, absent by default
            lines.append(f"{pad}{name}: null{about} (fields: {', '.join(kind.model_fields)})")
            continue
        value = yaml.safe_dump(json.loads(json.dumps(default, default=str)),
                               default_flow_style=True, width=1000).strip()
        value = value.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{pad}{name}: {value}{about}")
    return lines
