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

    kind: Literal["eels", "4dstem"] = Field("eels", description=
        'what to generate: an EELS spectrum image or a 4D-STEM scan')
    shape: tuple[int, int] = Field((128, 128), description='scan size in pixels (y, x)')
    channels: int = Field(1024, ge=64, description="energy channels (eels)")
    pattern: tuple[int, int] = Field((64, 64), description='diffraction pattern size (4dstem)')
    anomaly: bool = Field(True, description=
        'add anomalous regions (labelled -1 in the ground truth)')
    seed: int = Field(42, ge=0, description="seed of the generated scan")


class PreprocessConfig(Section):
    steps: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"step": "normalize", "method": "sum"}],
        description="the chain, in order: {step: NAME, parameters}; NAME one of crop, bin, "
        "mask_channels, background, centre, circular_crop, beam_mask, scale, anscombe, "
        "poisson_weight, normalize (emscale/preprocess.py)")
    nonfinite: Literal["mask", "zero", "error"] = Field("mask", description=
        'NaN/inf pixels: leave them out (mask), set them to 0, or stop')
    negative: Literal["clip", "keep", "error"] = Field("clip", description=
        'negative counts: clip to 0, keep, or stop')


class PCAConfig(Section):
    n_components: int = Field(16, ge=1,
        description='principal components kept (the scree is plotted over them)')
    solver: Literal["gram", "randomized", "incremental"] = Field("gram", description=
        'exact Gram-matrix tree reduction, randomized SVD, or scikit-learn IncrementalPCA')


class TrainSection(Section):
    """``emscale.train.TrainConfig``'s fields; its own checks run too."""

    model: Literal["mlp", "conv", "linear"] = Field("mlp", description=
        'autoencoder: MLP (spectra), convolutional (patterns) or linear')
    latent_dim: int = Field(4, description='size of the latent code that is clustered')
    widths: tuple[int, ...] = Field((256, 64), description=
        'hidden layer widths of the encoder (the decoder mirrors them)')
    epochs: int = Field(30, description='passes over the training pixels')
    batch_size: int = Field(256, description='pixels per optimiser step')
    lr: float = Field(1e-3, description='Adam learning rate (cosine schedule over the epochs)')
    weight_decay: float = Field(0.0, description="AdamW's decoupled weight decay (0: plain Adam)")
    loss: Literal["mse", "poisson"] = Field("mse", description=
        'reconstruction loss: squared error, or Poisson deviance on counts')
    objective: Literal["plain", "denoise"] = Field("denoise", description=
        'plain autoencoder, or denoising (noisy input, cleaner target)')
    noise: Literal["auto", "clean", "poisson", "gaussian"] = Field("auto", description=
        'denoising: clean target (synthetic scans), Poisson thinning (Noise2Noise) or Gaussian noise; auto: clean if there, else gaussian')
    noise_level: float = Field(0.5, description='strength of the corruption')
    val_fraction: float = Field(0.1, description='share of pixels held out for validation')
    tile: int = Field(16, description='train/validation split by spatial tiles of this many pixels a side')
    buffer_chunks: int = Field(2, description='navigation chunks shuffled together while streaming')
    max_train_pixels: Optional[int] = Field(65536, description=
        'at most this many training pixels (a regular grid); null: all')
    max_val_pixels: int = Field(16384, description='at most this many validation pixels')
    patience: int = Field(10, description=
        'stop after this many epochs without a better validation loss')
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=
        'auto: a GPU when the training worker has one')
    threads: Optional[int] = Field(None, description=
        "PyTorch threads for training; null: the worker's")


class EncodeConfig(Section):
    denoised: bool = Field(False, description=
        'also write the denoised scan (as large as the features)')
    error: Literal["auto", "poisson", "mse"] = Field("auto", description=
        'reconstruction error; auto: Poisson chi-square while the features are scaled counts, else MSE')


class AnomalyConfig(Section):
    method: Literal["combined", "recon_error", "mahalanobis"] = Field("combined", description=
        'anomaly score: reconstruction error, latent Mahalanobis distance, or the larger of both')
    calibration: Literal["reference", "robust"] = Field("robust", description=
        'threshold: quantile of normal data (reference/region), or median/MAD of the scan itself')
    quantile: float = Field(0.99, ge=0.5, lt=1,
        description='quantile of normal scores used as threshold (reference calibration)')
    false_alarm_rate: Optional[float] = Field(0.01, gt=0, le=0.5, description=(
        "share of normal pixels flagged (robust calibration's Gaussian tail)"))
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
    method: Literal["kmeans", "gmm"] = Field("kmeans", description=
        'k-means, or a Gaussian mixture (with phase probabilities)')
    n_clusters: int | Literal["auto"] = Field("auto", description=
        'number of phases, or auto: chosen over k_range')
    k_range: tuple[int, int] = Field((2, 8), description='smallest and largest K tried')
    k_choice: Optional[Literal["silhouette", "bic", "elbow"]] = Field(None, description=
        'how K is chosen; null: elbow for kmeans, BIC for gmm')
    n_init: int = Field(10, ge=1, description='restarts per K in the sweep (lowest inertia kept)')
    max_iter: int = Field(50, ge=1, description='full-data Lloyd/EM iterations')
    sample_size: int = Field(50_000, ge=10,
        description='pixels of the seeded sample the K sweep runs on')


class Workflow(Section):
    input: Optional[Path] = Field(None, description=
        'a scan store, or a raw file to ingest (or give synth)')
    synth: Optional[SynthConfig] = Field(None, description=
        'a generated scan instead of an input file')
    output: Path = Field(Path("emscale-output"), description=
        'the results directory (results.zarr, report/, emscale.log)')
    seed: int = Field(0, ge=0, description='the seed of every random draw')
    chunk_mib: float = Field(64.0, gt=0, le=1024, description=(
        "navigation block size, in MiB of float32, of the scan the run writes (generated or "
        "ingested): a worker holds a few blocks at a time, and a killed stage redoes only its "
        "unfinished blocks"))
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
    from emscale.preprocess import Preprocessor

    kind = None if wf.synth is None else {"eels": "spectrum", "4dstem": "diffraction"}[wf.synth.kind]
    try:
        wf.train_config()  # TrainConfig's own checks, with their field names
        # the chain's step names, parameters and choices, before any data are read
        Preprocessor(list(wf.preprocess.steps), wf.preprocess.nonfinite,
                     wf.preprocess.negative).check(kind)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return wf


def defaults_yaml() -> str:
    """Every workflow field with its default and description, as a commented YAML document
    (``emscale defaults``)."""
    return "\n".join(_describe(Workflow, 0)) + "\n"


def _describe(model: type[BaseModel], depth: int) -> list[str]:
    import typing

    lines, pad = [], "  " * depth
    for name, field in model.model_fields.items():
        kind = next((t for t in (field.annotation, *typing.get_args(field.annotation))
                     if isinstance(t, type) and issubclass(t, Section)), None)
        about = f"  # {field.description}" if field.description else ""
        if kind is not None and field.default is not None:
            lines.append(f"{pad}{name}:{about}")
            lines.extend(_describe(kind, depth + 1))
            continue
        if kind is not None:  # an optional section, absent by default
            lines.append(f"{pad}{name}: null{about} (fields: {', '.join(kind.model_fields)})")
            continue
        default = field.get_default(call_default_factory=True)
        value = yaml.safe_dump(json.loads(json.dumps(default, default=str)),
                               default_flow_style=True, width=1000).strip()
        value = value.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{pad}{name}: {value}{about}")
    return lines
