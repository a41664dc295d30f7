"""The ``train`` stage: a minibatch (denoising) autoencoder trained on the normal data's features.

The section (``TrainConfig``) is what ``emscale.trainer.train_autoencoder`` takes; the data come
from ``emscale.train_stream`` (chunks streamed from Zarr), the model from ``emscale.models``.
Where the model learns what is normal is the anomaly section's business (a declared region, a
reference scan, or the scan itself): the runner passes it as ``NormalData``. The stage group
holds the loss curves and the best weights as plain float32 arrays (``emscale.model_spec``
rebuilds the model from them; nothing is unpickled).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import ClassVar, Literal, Optional

import numpy as np
import xarray as xr
from pydantic import Field, model_validator

from emscale.config import Section, json_safe
from emscale.stages.base import Context, Output, Stage


SELF_TRIM = 0.1  # the trimmed share when a scan is trained on itself (anomalies included)


class TrainConfig(Section):
    """The ``train`` section."""

    name: ClassVar[str] = "train"

    model: Literal["mlp", "conv", "linear"] = Field("mlp", description=
        'autoencoder: MLP (spectra), convolutional (patterns) or linear (the PCA check)')
    latent_dim: int = Field(4, ge=1, description='size of the latent code that is clustered')
    variational: bool = Field(False, description=
        'a variational autoencoder (mlp, conv): codes drawn around a mean with a learned spread, '
        "KL divergence to N(0, 1) in the loss; the mean is the pixel's code")
    kl_weight: float = Field(1.0, ge=0, allow_inf_nan=False, description=
        "variational: the loss is the reconstruction loss (mean per feature) + kl_weight x the "
        'KL divergence per feature (beta-VAE: above 1, smoother, more disentangled codes)')
    pca_path: bool = Field(False, description=
        "a linear path beside the network (mlp, conv), set to the training pixels' principal "
        'components, the network adding to it from zero: training starts at PCA\'s '
        'reconstruction at latent_dim and only improves on it; the codes are the PCA scores plus '
        "the network's correction")
    widths: tuple[int, ...] = Field((256, 64), description=
        'hidden layer widths of the encoder (the decoder mirrors them)')
    epochs: int = Field(30, ge=1, description='passes over the training pixels')
    batch_size: int = Field(256, ge=1, description='pixels per optimiser step')
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description=
        'Adam learning rate (cosine schedule over the epochs)')
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description=
        "AdamW's decoupled weight decay (0: plain Adam)")
    loss: Literal["mse", "poisson"] = Field("mse", description=
        'reconstruction loss: squared error, or Poisson deviance on counts')
    objective: Literal["plain", "denoise"] = Field("denoise", description=
        'plain autoencoder, or denoising (noisy input, cleaner target)')
    noise: Literal["auto", "clean", "poisson", "gaussian"] = Field("auto", description=
        'denoising: clean target (synthetic scans), Poisson thinning (Noise2Noise) or Gaussian '
        'noise; auto: clean if there, else gaussian')
    noise_level: float = Field(0.5, gt=0, allow_inf_nan=False, description=
        'strength of the corruption (below 1 for poisson thinning)')
    val_fraction: float = Field(0.1, gt=0, lt=1, description=
        'share of pixels held out for validation')
    tile: int = Field(16, ge=1, description=
        'train/validation split by spatial tiles of this many pixels a side')
    buffer_chunks: int = Field(2, ge=1, description=
        'navigation chunks shuffled together while streaming')
    resident_mib: float = Field(1024, ge=0, description=
        'hold the training pixels in memory (read and decoded once, not every epoch) when they '
        'take at most this (features and clean targets); the epochs draw the same batches '
        'either way')
    max_train_pixels: Optional[int] = Field(65536, ge=1, description=
        'at most this many training pixels (a regular grid); null: all')
    max_val_pixels: int = Field(16384, ge=1, description='at most this many validation pixels')
    trim: Optional[float] = Field(None, ge=0, lt=0.5, description=
        'trimmed loss: the pixels whose loss is in the top this share (cut at that quantile of '
        "the previous epoch's validation losses) do not train the model, so rare structure "
        '(anomalies) is not learned and stays visible in the reconstruction error; 0: off; '
        f'null: {SELF_TRIM} when the model trains on the scan itself (no anomaly.reference, no '
        'normal_region), else 0')
    patience: int = Field(10, ge=1, description=
        'stop after this many epochs without a better validation loss')
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=
        'auto: a GPU when the training worker has one')
    threads: Optional[int] = Field(None, ge=1, description=
        "PyTorch threads for training; null: the worker's")
    prefetch: Optional[bool] = Field(None, description=
        'read the next chunks in a background thread; null: on CUDA only')

    @model_validator(mode="after")
    def _consistent(self):
        if any(w < 1 for w in self.widths):
            raise ValueError(f"widths: must be positive integers, got {list(self.widths)}")
        if self.noise == "poisson" and self.objective == "denoise" and not self.noise_level < 1:
            raise ValueError("noise_level: poisson thinning keeps a share of the counts: below 1")
        if self.variational and self.model == "linear":
            raise ValueError("variational: the linear autoencoder (the PCA check) is not "
                             "variational; use 'mlp' or 'conv'")
        if self.pca_path and self.loss == "poisson":
            raise ValueError("pca_path: the PCA of the features is the start of a squared-error "
                             "fit; the Poisson loss fits a log-rate: use loss 'mse'")
        if self.pca_path and self.model == "linear":
            raise ValueError("pca_path: the linear autoencoder is the PCA check itself; use "
                             "'mlp' or 'conv'")
        if self.loss == "poisson" and self.model == "linear":
            raise ValueError("loss: the linear autoencoder (the PCA check) trains with 'mse'")
        return self

    def hash(self, data: str = "", seed: int = 0, region=None) -> str:
        """What a checkpoint must match to be resumed: the settings that change the result (not
        threads, device, prefetch or resident_mib), the seed, the normal region and, given as
        ``data``, a signature of the training data."""
        fields = self.model_dump(mode="json",
                                 exclude={"threads", "device", "prefetch", "resident_mib"})
        region = None if region is None else [int(v) for v in region]
        blob = json.dumps([fields, data, seed, region], sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_dataset(result) -> xr.Dataset:
    """The ``train`` stage of a ``TrainResult``: loss curves per epoch; the config, seed, normal
    region and best epoch in attrs; the best weights as plain arrays (``weights``, one float32
    vector with the layout in its attrs, and ``feature_mean`` with the ``scale`` of the
    standardisation)."""
    h = result.history
    layout, flat, offset = [], [], 0
    for name, tensor in result.model.state_dict().items():
        values = tensor.detach().cpu().numpy().astype(np.float32).ravel()
        layout.append({"name": name, "shape": list(tensor.shape), "offset": offset})
        flat.append(values)
        offset += values.size
    attrs = {"config": result.config.model_dump(mode="json"), "seed": result.seed,
             "normal_region": result.normal_region,
             "config_hash": result.config.hash(seed=result.seed, region=result.normal_region),
             "best_epoch": result.best_epoch, "device": result.device,
             "samples_per_s": (result.samples_per_s if math.isfinite(result.samples_per_s)
                               else None),
             "resumed_from": result.resumed_from}
    return xr.Dataset(
        {"train_loss": (("epoch",), np.asarray(h["train_loss"], np.float64)),
         "val_loss": (("epoch",), np.asarray(h["val_loss"], np.float64)),
         "learning_rate": (("epoch",), np.asarray(h["lr"], np.float64)),
         "epoch_seconds": (("epoch",), np.asarray(h["seconds"], np.float64)),
         "weights": (("parameter",), np.concatenate(flat), {"layout": json_safe(layout)}),
         "feature_mean": (("feature",), np.asarray(result.mean, np.float32),
                          {"scale": float(result.scale)})},
        coords={"epoch": np.arange(len(h["train_loss"]))},
        attrs={"train": json_safe(attrs)},
    )


def write_train_stage(results, result, *, overwrite: bool = False) -> xr.Dataset:
    """``train_dataset(result)`` written as the ``train`` group of ``results``."""
    return results.write_stage("train", train_dataset(result), overwrite=overwrite)


def _build(ctx: Context) -> xr.Dataset:
    import tempfile

    from emscale.trainer import train_where_the_data_are

    normal = ctx.normal
    stage = normal.training_features() if normal.training_features is not None \
        else ctx.input("preprocess")
    with contextlib.ExitStack() as stack:
        # the training set and checkpoints live in the run's directory (kept for resume), or,
        # for a stage run alone, in a temporary one
        workdir = ctx.workdir if ctx.workdir is not None \
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="emscale-train-")))
        checkpoints = workdir / "checkpoints" / ctx.key
        path = _training_set(ctx, stage, checkpoints / "train_set.zarr")
        config = ctx.config
        if config.trim is None:  # anomalies are in the training data only without both
            itself = normal.region is None and normal.reference is None
            config = config.model_copy(update={"trim": SELF_TRIM if itself else 0.0})
        with _epoch_lines(checkpoints, ctx.note):
            result = train_where_the_data_are(path, config, seed=ctx.seed,
                                              normal_region=normal.region,
                                              checkpoint_dir=checkpoints)
    if result.resumed_from is not None:
        ctx.note(f"resumed from the checkpoint of epoch {result.resumed_from}")
    return train_dataset(result)


@contextlib.contextmanager
def _epoch_lines(checkpoints: Path, note, every: float = 1.0):
    """While training runs (on a worker), show each epoch the trainer logs to the checkpoint
    directory: epoch, losses and seconds, as the runner's lines."""
    import json

    from emscale.progress import repeating
    from emscale.trainer import EPOCH_LOG

    path = checkpoints / EPOCH_LOG
    seen = [path.stat().st_size if path.exists() else 0]  # (a resumed run: the new epochs)

    def show():
        if not path.exists():
            return
        with open(path) as f:
            f.seek(seen[0])
            for line in f:
                if not line.endswith("\n"):
                    break
                seen[0] += len(line)
                e = json.loads(line)
                note(f"epoch {e['epoch'] + 1}/{e['epochs']}: train loss {e['train_loss']:.5g}, "
                     f"validation loss {e['val_loss']:.5g}, {e['seconds']:.1f} s")

    with repeating(show, every, name="epoch-lines", final=True):
        yield


def _training_set(ctx: Context, stage: xr.Dataset, path: Path) -> Path:
    """Gather the training pixels once (kept next to the checkpoints, reused on resume)."""
    import time

    from emscale.train_stream import gather_training_set

    if (path / "zarr.json").exists():
        return path
    t0 = time.perf_counter()
    gather_training_set(stage, ctx.config, path, normal_region=ctx.normal.region,
                        progress=ctx.progress)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    ctx.note(f"training set gathered in {time.perf_counter() - t0:.1f} s: {_pixels(path)} "
             f"pixels, {size / 1e9:.2f} GB on disk ({path})")
    return path


def _pixels(path) -> int:
    import zarr

    return int(np.prod(zarr.open_array(str(path / "valid"), mode="r").shape))


STAGE = Stage(
    name="train", config=TrainConfig, reads=("preprocess",), build=_build, uses_normal=True,
    library=TrainConfig,
    about="the autoencoder, trained on the normal data (streamed from the preprocess stage)",
    outputs={
        "train_loss": Output(("epoch",), "mean training loss of the epoch"),
        "val_loss": Output(("epoch",), "validation loss (tiles held out)"),
        "learning_rate": Output(("epoch",), "the cosine schedule's rate"),
        "epoch_seconds": Output(("epoch",), "wall time of the epoch", "s"),
        "weights": Output(("parameter",), "the best epoch's weights, flat float32; attrs layout: "
                          "[{name, shape, offset}]"),
        "feature_mean": Output(("feature",), "the standardisation: features minus this, over "
                               "attrs scale"),
    },
    attrs={"train": "config, seed, normal_region, config_hash, best_epoch, device, "
                    "samples_per_s, resumed_from"},
)
