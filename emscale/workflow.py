"""The workflow file: one YAML document that says what ``emscale run`` does, validated by pydantic.

Unknown keys and bad values are refused with the field's path (``train.latent_dim: ...``). Every
section has defaults, so a workflow can be as short as an input. The sections mirror the stages:

```yaml
input: scan.zarr            # a scan store, or a raw file to ingest, or:
synth: {kind: eels, shape: [128, 128], channels: 1024, anomaly: true, seed: 42}
output: results/            # the results directory (results.zarr, report/, emscale.log)
seed: 0                     # the default seed of every stage
preprocess: {steps: [{step: normalize, method: sum}]}
pca: {n_components: 16, solver: gram}
train: {latent_dim: 4, epochs: 30}          # emscale.train.TrainConfig fields
encode: {denoised: false, error: auto}
anomaly: {calibration: robust, false_alarm_rate: 0.01}   # or normal_region / reference
cluster: {method: kmeans, n_clusters: auto, k_range: [2, 8]}
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emscale.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthConfig(Section):
    """A generated scan instead of an input file (demos, tests, benchmarks)."""

    kind: Literal["eels", "4dstem"] = "eels"
    shape: tuple[int, int] = (128, 128)
    channels: int = Field(1024, ge=64, description="energy channels (eels)")
    pattern: tuple[int, int] = (64, 64)
    anomaly: bool = True
    seed: int = Field(42, ge=0)


class PreprocessConfig(Section):
    steps: list[dict[str, Any]] = Field(default_factory=lambda: [{"step": "normalize",
                                                                  "method": "sum"}])
    nonfinite: Literal["mask", "zero", "error"] = "mask"
    negative: Literal["clip", "keep", "error"] = "clip"


class PCAConfig(Section):
    n_components: int = Field(16, ge=1)
    solver: Literal["gram", "randomized", "incremental"] = "gram"


class TrainSection(Section):
    """``emscale.train.TrainConfig``'s fields; its own checks run too."""

    model: Literal["mlp", "conv", "linear"] = "mlp"
    latent_dim: int = 4
    widths: tuple[int, ...] = (256, 64)
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    loss: Literal["mse", "poisson"] = "mse"
    objective: Literal["plain", "denoise"] = "denoise"
    noise: Literal["auto", "clean", "poisson", "gaussian"] = "auto"
    noise_level: float = 0.5
    val_fraction: float = 0.1
    tile: int = 16
    buffer_chunks: int = 2
    max_train_pixels: Optional[int] = 65536
    max_val_pixels: int = 16384
    patience: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = None


class EncodeConfig(Section):
    denoised: bool = False
    error: Literal["auto", "poisson", "mse"] = "auto"


class AnomalyConfig(Section):
    method: Literal["combined", "recon_error", "mahalanobis"] = "combined"
    calibration: Literal["reference", "robust"] = "robust"
    quantile: float = Field(0.99, ge=0.5, lt=1)
    false_alarm_rate: Optional[float] = Field(0.01, gt=0, le=0.5)
    normal_region: Optional[tuple[int, int, int, int]] = Field(
        None, description="(y0, y1, x0, x1) declared normal: training and calibration use it")
    reference: Optional[Path] = Field(
        None, description="a scan store of normal data: the model is trained and calibrated on it")

    @model_validator(mode="after")
    def _one_reference(self):
        if self.normal_region is not None and self.reference is not None:
            raise ValueError("give normal_region or reference, not both")
        return self


class ClusterConfig(Section):
    method: Literal["kmeans", "gmm"] = "kmeans"
    n_clusters: int | Literal["auto"] = "auto"
    k_range: tuple[int, int] = (2, 8)
    k_choice: Optional[Literal["silhouette", "bic", "elbow"]] = None
    n_init: int = Field(10, ge=1)
    max_iter: int = Field(50, ge=1)
    sample_size: int = Field(50_000, ge=10)


class Workflow(Section):
    input: Optional[Path] = None
    synth: Optional[SynthConfig] = None
    output: Path = Path("emscale-output")
    seed: int = Field(0, ge=0)
    preprocess: PreprocessConfig = PreprocessConfig()
    pca: PCAConfig = PCAConfig()
    train: TrainSection = TrainSection()
    encode: EncodeConfig = EncodeConfig()
    anomaly: AnomalyConfig = AnomalyConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _one_input(self):
        if (self.input is None) == (self.synth is None):
            raise ValueError("give exactly one of input (a scan store or raw file) and synth")
        return self

    @field_validator("output")
    @classmethod
    def _not_empty(cls, v: Path) -> Path:
        if str(v).strip() in ("", "."):
            raise ValueError("must name a directory for the results")
        return v

    def train_config(self, **overrides):
        """The ``TrainConfig`` of this workflow (its checks run, errors name ``train.<field>``)."""
        from emscale.train import TrainConfig

        fields = {**self.train.model_dump(), "seed": self.seed, **overrides}
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in fields.items() if k in known})
        cfg.check()
        return cfg

    def section_hash(self, *names: str) -> str:
        """A short hash of the named sections (and the seed): a stage's cache key."""
        data = self.model_dump(mode="json")
        blob = json.dumps([data.get(n) for n in names] + [self.seed], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_workflow(path: str | Path, **overrides) -> Workflow:
    """Read and validate a workflow file; ``overrides`` (command-line values) win over it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the workflow ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a workflow is a mapping of sections, got {type(data).__name__}")
    for key, value in overrides.items():
        if value is not None:
            data[key] = str(value) if isinstance(value, Path) else value
    if overrides.get("input") is not None:
        data.pop("synth", None)
    return validate_workflow(data, source=str(path))


def validate_workflow(data: dict, source: str = "workflow") -> Workflow:
    try:
        wf = Workflow.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: {where}: {msg}{more}") from None
    try:
        wf.train_config()  # TrainConfig's own checks, with their field names
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return wf
