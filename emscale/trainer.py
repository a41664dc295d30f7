"""The training loop: a minibatch autoencoder on a ``preprocess`` stage streamed from Zarr.

- **Objective.** Plain, or denoising: the target is the clean signal when the stage has
  ``clean_features`` (synthetic scans), otherwise the input is corrupted (``poisson``: binomial
  thinning of counts to ``noise_level`` of the dose, rescaled; ``gaussian``: noise of
  ``noise_level`` times the data's spread). Losses: ``mse`` on standardised features, or ``poisson``
  (negative log-likelihood of counts; the decoder then outputs a log-rate).
- **Optimiser.** Adam (AdamW with ``weight_decay``), cosine learning-rate schedule over ``epochs``,
  early stopping on the validation loss (``patience`` epochs; the best weights are kept).
- **Determinism and resume.** Every random choice of an epoch (chunk order, shuffles, noise) is
  drawn from generators seeded by ``(seed, epoch)``, so a run killed after epoch *e* and resumed
  from its checkpoint makes exactly the same draws as one that never stopped: on a CPU the
  weights end identical. Checkpoints (weights, optimiser, scheduler, epoch, history, best weights,
  config hash) are written atomically every epoch with ``torch.save`` and read back with
  ``torch.load(weights_only=True)``, which cannot run code.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emscale.errors import ConfigError
from emscale.stages.train import TrainConfig
from emscale.train_stream import ChunkStream

log = logging.getLogger(__name__)

EPOCH_LOG = "epochs.jsonl"  # one JSON line per epoch, in the checkpoint directory


@dataclass
class TrainResult:
    model: Any
    history: dict[str, list[float]]
    best_epoch: int
    mean: np.ndarray
    scale: float
    config: TrainConfig
    device: str
    samples_per_s: float
    resumed_from: int | None = None
    seed: int = 0
    normal_region: tuple[int, int, int, int] | None = None
    extra: dict = field(default_factory=dict)


def pick_device(config: TrainConfig):
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' asked for but no CUDA device is available")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if not use_cuda and config.threads:
        torch.set_num_threads(config.threads)
    if use_cuda:
        # cuDNN's fastest convolution gradients add in a varying order: a conv model resumed
        # from a checkpoint then ended 1e-7 away from the straight run (seen on an H200)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    return torch.device("cuda" if use_cuda else "cpu")


class _Objective:
    """Inputs and targets of a batch (standardised), the loss, and the reconstruction."""

    def __init__(self, config: TrainConfig, has_clean: bool, mean, scale, device,
                 noise_scale: float | None = None):
        import torch

        self.config = config
        self.noise = config.noise
        if config.objective == "denoise" and self.noise == "auto":
            self.noise = "clean" if has_clean else "gaussian"
        if config.objective == "denoise" and self.noise == "clean" and not has_clean:
            raise ConfigError("train.noise: 'clean' needs a stage with clean_features "
                              "(a synthetic scan); use 'poisson' or 'gaussian'")
        self.denoise = config.objective == "denoise"
        self.mean = torch.as_tensor(mean, device=device)
        self.scale = float(scale)
        self.noise_scale = float(noise_scale if noise_scale is not None else scale)
        self.device = device
        # Poisson thinning: the input is a thinned copy x1 ~ Bin(x, p), rescaled by 1/p; the target
        # is the rest x - x1, independent of x1 given the rate (Noise2Noise): MSE against
        # (x - x1)/(1 - p), or Poisson NLL of x - x1 at the rate times (1 - p)
        self.thinning = self.denoise and self.noise == "poisson"
        self.log_rest = math.log(1 - config.noise_level) if self.thinning else 0.0

    def standardise(self, x):
        return (x - self.mean).mul_(1.0 / self.scale)

    def batch(self, x, clean, gen):
        """(input, target) of a batch: the input standardised; the target standardised for MSE,
        in counts for the Poisson loss."""
        import torch

        x = torch.as_tensor(x, device=self.device)
        target = torch.as_tensor(clean, device=self.device) if (self.denoise and self.noise == "clean") else x
        inp = x
        if self.thinning:
            p = self.config.noise_level
            counts = torch.clamp(torch.round(x), min=0).cpu()
            thinned = torch.binomial(counts, torch.full_like(counts, p), generator=gen)
            inp = (thinned / p).to(self.device)
            rest = (counts - thinned).to(self.device)
            target = rest if self.config.loss == "poisson" else rest / (1 - p)
        elif self.denoise and self.noise == "gaussian":
            noise = torch.randn(x.shape, generator=gen).to(self.device)
            inp = x + noise * (self.config.noise_level * self.noise_scale)
        std_inp = self.standardise(inp)
        if self.config.loss == "poisson":
            return std_inp, target
        # the plain objective's target is its input: standardised once
        return std_inp, std_inp if target is inp else self.standardise(target)

    def pixel_loss(self, out, target, model=None):
        """The loss of each pixel (mean over its features); for a variational ``model``, plus
        ``kl_weight`` x its KL divergence (of the last forward) per feature."""
        import torch

        if self.config.loss == "poisson":
            each = torch.nn.functional.poisson_nll_loss(out + self.log_rest,
                                                        torch.clamp(target, min=0),
                                                        log_input=True, full=False,
                                                        reduction="none")
        else:
            each = torch.nn.functional.mse_loss(out, target, reduction="none")
        each = each.reshape(len(each), -1)
        if model is not None and model.variational:
            return each.mean(1) + model.kl * (self.config.kl_weight / each.shape[1])
        return each.mean(1)

    def loss(self, out, target, threshold: float | None = None, model=None):
        """The mean pixel loss; with a ``threshold`` (the trimmed loss), over the pixels at or
        under it only: what fits worst is not learned."""
        each = self.pixel_loss(out, target, model)
        if threshold is None:
            return each.mean()
        return _trimmed_mean(each, threshold)


def _trimmed_mean(each, threshold: float):
    """Mean of the pixel losses at or under ``threshold`` (0 when none is: the batch teaches
    nothing, as it should)."""
    keep = each <= threshold
    return (each * keep).sum() / keep.sum().clamp(min=1)


def _seed(seed: int, epoch: int, stream: int) -> int:
    """Independent seeds for (run seed, epoch, stream): 0 training draws, 1 validation noise, 2
    the variational codes' draws."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def _save_atomic(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".partial")
    try:
        torch.save(obj, tmp)
    except RuntimeError as exc:
        # torch reports a full disk as "unexpected pos ..." or an iostream error
        tmp.unlink(missing_ok=True)
        if shutil.disk_usage(path.parent).free < (1 << 20) + _size_of(obj):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _size_of(obj) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict."""
    if isinstance(obj, dict):
        return sum(_size_of(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_size_of(v) for v in obj)
    return obj.numel() * obj.element_size() if hasattr(obj, "numel") else 0


def train_autoencoder(stage_path: str | os.PathLike, config: TrainConfig | None = None, *,
                      seed: int = 0, normal_region: tuple[int, int, int, int] | None = None,
                      checkpoint_dir: str | os.PathLike | None = None,
                      stop_after_epoch: int | None = None) -> TrainResult:
    """Train on a ``preprocess`` stage directory (only on ``normal_region`` (y0, y1, x0, x1) of
    it when given; every random draw from ``seed``); resume from ``checkpoint_dir`` if it holds
    a checkpoint of the same config and data. ``stop_after_epoch`` ends the run early as a kill
    would (tests)."""
    import torch

    from emscale.models import build_model

    config = config or TrainConfig()
    stream = ChunkStream(stage_path, config, seed=seed, normal_region=normal_region)
    key = config.hash(stream.signature(), seed, stream.region)
    if stream.clean is None and config.objective == "denoise" and config.noise == "clean":
        raise ConfigError("train.noise: 'clean' needs a stage with clean_features")
    shape = stream.signal_shape if config.model == "conv" else (stream.n_features,)
    device = pick_device(config)
    torch.manual_seed(seed)
    model = build_model(config.model, tuple(shape), config.latent_dim, tuple(config.widths),
                        variational=config.variational, pca_path=config.pca_path).to(device)
    opt = _adamw(list(model.parameters()), config)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "lr": [], "seconds": [],
                                       "trim_threshold": []}
    best = {"val": math.inf, "epoch": -1, "state": None}
    bad_epochs, start = 0, 0
    mean, scale = None, None
    ckpt = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir else None
    resumed_from = None
    state = _load_checkpoint(ckpt, device) if ckpt is not None and ckpt.exists() else None
    if state is not None:
        history, best, bad_epochs, start, mean, scale = _resume(state, ckpt, key, model, opt,
                                                                 sched)
        resumed_from = start - 1
    if mean is None:
        mean, scale = stream.moments()
        if config.pca_path:  # (a resumed model has its weights from the checkpoint)
            components = stream.principal_components(config.latent_dim, mean, scale, seed)
            model.start_at_pca(torch.from_numpy(components).to(device))
    data_scale = scale
    if config.model == "linear":
        scale = 1.0  # the PCA check: centred, not scaled (noise keeps the data's spread)
    objective = _Objective(config, stream.clean is not None, mean, scale, device,
                           noise_scale=data_scale)
    seen, train_time = 0, 0.0
    for epoch in range(start, config.epochs):
        if bad_epochs >= config.patience:  # resumed after an early stop
            break
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(_seed(seed, epoch, 0))
        model.generator = torch.Generator().manual_seed(_seed(seed, epoch, 2))  # variational draws
        # the trimmed loss's cut: from the previous epoch's validation pixels (none in the first)
        cut = history["trim_threshold"][-1] if config.trim and history["trim_threshold"] else None
        total, count = _train_epoch(model, opt, stream, objective, epoch, config.batch_size, gen,
                                    threshold=cut)
        seen += count
        train_time += time.perf_counter() - t0  # the training steps only, for samples/s
        history["lr"].append(float(opt.param_groups[0]["lr"]))
        sched.step()
        val, cut = evaluate_loss(model, stream, objective, config.batch_size, gen_seed=seed,
                                 trim=config.trim)
        if config.trim:
            history["trim_threshold"].append(cut)
        dt = time.perf_counter() - t0
        history["train_loss"].append(total / max(count, 1))
        history["val_loss"].append(val)
        history["seconds"].append(dt)
        if val < best["val"]:
            best = {"val": val, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            bad_epochs = 0
        else:
            bad_epochs += 1
        log.info("epoch %d: train %.5g, val %.5g (%.1f s)", epoch, history["train_loss"][-1], val, dt)
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            with open(ckpt.parent / EPOCH_LOG, "a") as f:  # what the client shows, line by line
                f.write(json.dumps({"epoch": epoch, "epochs": config.epochs, "seconds": dt,
                                    "train_loss": history["train_loss"][-1],
                                    "val_loss": val}) + "\n")
            _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "epoch": epoch, "config_hash": key,
                          "history": history, "best_val": best["val"],
                          "best_epoch": best["epoch"], "best_state": best["state"],
                          "bad_epochs": bad_epochs, "mean": torch.as_tensor(mean),
                          "scale": scale}, ckpt)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        if bad_epochs >= config.patience:
            log.info("early stop at epoch %d (best %d)", epoch, best["epoch"])
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.generator, model.kl = None, None  # (a generator cannot be pickled to the client)
    # returned on the CPU (``device`` says where it trained): a CUDA model pickled back from a GPU
    # worker cannot be loaded by a client without CUDA, and callers compare it with numpy
    model.eval().cpu()
    return TrainResult(model=model, history=history, best_epoch=best["epoch"], mean=mean,
                       scale=scale, config=config, device=str(device),
                       samples_per_s=seen / train_time if train_time else float("nan"),
                       resumed_from=resumed_from, seed=seed, normal_region=stream.region)


def _adamw(params: list, config: TrainConfig):
    """AdamW with torch's fused kernel where it has one for the device (CPU from torch 2.4):
    one kernel per step instead of ten operations per tensor (0.7 ms a step against 22 for
    an EELS MLP on 2 busy cores here)."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                 fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _load_checkpoint(ckpt: Path, device) -> dict | None:
    """A checkpoint loaded as plain tensors and numbers (``weights_only``: nothing in it can
    run). One that does not load (damaged, or holding code) is set aside, named, and training
    starts afresh (None): a checkpoint is only a cache of the run."""
    import torch

    try:
        return torch.load(ckpt, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several kinds; its message advises unpickling
        aside = ckpt.with_name(f"{ckpt.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(ckpt, aside)
        log.warning("%s: not a checkpoint emscale can load safely (%s); set aside as %s, "
                    "training starts from the first epoch", ckpt, type(exc).__name__, aside.name)
        return None


def _resume(state: dict, ckpt: Path, key: str, model, opt, sched):
    """Load a checkpoint of the same config and data into the model, optimiser and schedule:
    (history, best, bad epochs, first epoch to run, mean, scale)."""
    if state["config_hash"] != key:
        raise ConfigError(f"{ckpt}: checkpoint of another training config or stage "
                          f"({state['config_hash']} != {key}); remove it to restart")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    best = {"val": float(state["best_val"]), "epoch": int(state["best_epoch"]),
            "state": state["best_state"]}
    log.info("resuming %s from epoch %d", ckpt, int(state["epoch"]))
    history = {"trim_threshold": [], **{k: list(v) for k, v in state["history"].items()}}
    return (history, best, int(state["bad_epochs"]),
            int(state["epoch"]) + 1, state["mean"].cpu().numpy(), float(state["scale"]))


def _train_epoch(model, opt, stream: ChunkStream, objective: _Objective, epoch: int,
                 batch_size: int, gen, threshold: float | None = None) -> tuple[float, int]:
    """One pass over the training pixels: (summed loss, pixels). With a ``threshold``, the
    pixels whose loss is above it do not contribute (the trimmed loss)."""
    model.train()
    total, count = 0.0, 0
    for x, clean in stream.batches(0, epoch, batch_size):
        inp, target = objective.batch(x, clean, gen)
        out, _ = model(inp)
        loss = objective.loss(out, target, threshold, model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(x)
        count += len(x)
    return total, count


def evaluate_loss(model, stream: ChunkStream, objective: _Objective, batch_size: int,
                  gen_seed: int = 0, trim: float = 0.0) -> tuple[float, float | None]:
    """Mean loss over the validation set (noise drawn the same way every epoch), and with
    ``trim`` the cut of the trimmed loss: the (1 - trim) quantile of the validation pixels'
    losses, the mean then taken over the pixels under it."""
    import torch

    gen = torch.Generator().manual_seed(_seed(gen_seed, 0, 1))
    model.eval()
    x_all, clean_all = stream.validation_set()
    step = max(batch_size, 4096)
    losses = []
    with torch.no_grad():
        for s in range(0, len(x_all), step):
            clean = None if clean_all is None else clean_all[s:s + step]
            inp, target = objective.batch(x_all[s:s + step], clean, gen)
            out, _ = model(inp)
            losses.append(objective.pixel_loss(out, target, model).double().cpu())
    model.train()
    if not losses:
        return float("nan"), None
    each = torch.cat(losses)
    if not trim:
        return float(each.mean()), None
    cut = float(torch.quantile(each, 1 - trim))
    return float(_trimmed_mean(each, cut)), cut


def train_on_cluster(client, stage_path, config: TrainConfig, **kwargs) -> TrainResult:
    """Run the training in one worker process, the one with a ``GPU`` resource if any worker
    declares one; it reads the Zarr chunks itself (shared storage), so no data pass through the
    client or the scheduler."""
    info = client.scheduler_info()["workers"]
    gpu = any(w.get("resources", {}).get("GPU") for w in info.values())
    # a key of its own per attempt: a failed attempt's key, still referenced (its traceback
    # holds this future), would hand the rerun the same error on a cluster that outlives a run
    future = client.submit(train_autoencoder, str(stage_path), config, pure=False,
                           resources={"GPU": 1} if gpu else None,
                           key=f"train-{config.hash()}-{uuid.uuid4().hex[:8]}", **kwargs)
    try:
        return future.result()
    finally:
        future.release()
        from emscale.dask_cluster import give_back_freed_memory

        client.run(give_back_freed_memory)


def train_where_the_data_are(stage_path, config: TrainConfig, **kwargs) -> TrainResult:
    """Train on the active cluster's worker (a GPU one when there is one) when a client is
    active, else in this process."""
    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        client = None
    if client is None:
        return train_autoencoder(stage_path, config, **kwargs)
    if kwargs.get("checkpoint_dir") is not None:
        kwargs["checkpoint_dir"] = str(kwargs["checkpoint_dir"])
    return train_on_cluster(client, stage_path, config, **kwargs)
