"""The training stage: a minibatch autoencoder streamed from the ``preprocess`` stage's Zarr chunks.

- **Data.** ``ChunkStream`` reads the features chunk by chunk with zarr (no dask: training runs in
  one process), holding at most ``buffer_chunks`` navigation chunks: the chunks' order is shuffled
  every epoch and the pixels of each group of chunks are shuffled together (a shuffle buffer), so
  memory depends on chunk size, never on scan size. Invalid pixels are skipped.
- **Split.** Train and validation pixels are separated by spatial tiles (``tile`` x ``tile``
  pixels, a seeded ``val_fraction`` of the tiles), never pixel by pixel: neighbouring pixels are
  nearly the same spectrum and would leak. ``max_train_pixels`` keeps a regular grid of training
  pixels (spatially uniform) on huge scans.
- **Objective.** Plain, or denoising: the target is the clean signal when the stage has
  ``clean_features`` (synthetic scans), otherwise the input is corrupted (``poisson``: binomial
  thinning of counts to ``noise_level`` of the dose, rescaled; ``gaussian``: noise of
  ``noise_level`` times the data's spread). Losses: ``mse`` on standardised features, or ``poisson``
  (negative log-likelihood of counts; the decoder then outputs a log-rate).
- **Optimiser.** Adam, cosine learning-rate schedule over ``epochs``, early stopping on the
  validation loss (``patience`` epochs; the best weights are kept).
- **Determinism and resume.** Every random choice of an epoch (chunk order, shuffles, noise) is
  drawn from generators seeded by ``(seed, epoch)``, so a run killed after epoch *e* and resumed
  from its checkpoint makes exactly the same draws as one that never stopped: on a CPU the
  weights end identical. Checkpoints (weights, optimiser, scheduler, epoch, history, best weights,
  config hash) are written atomically every epoch with ``torch.save`` and read back with
  ``torch.load(weights_only=True)``, which cannot run code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from emscale.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

LOSSES = ("mse", "poisson")
OBJECTIVES = ("plain", "denoise")
NOISES = ("auto", "clean", "poisson", "gaussian")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    model: str = "mlp"
    latent_dim: int = 8
    widths: tuple[int, ...] = (256, 64)
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (0: plain Adam)
    loss: str = "mse"
    objective: str = "denoise"
    noise: str = "auto"
    noise_level: float = 0.5
    val_fraction: float = 0.1
    tile: int = 16
    buffer_chunks: int = 2
    max_train_pixels: int | None = None
    max_val_pixels: int = 16384
    # (y0, y1, x0, x1): train and validate only on this region, declared normal (anomaly scoring)
    normal_region: tuple[int, int, int, int] | None = None
    prefetch: bool | None = None  # read the next chunks in a background thread; None: on CUDA only
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int | None = None

    def check(self) -> None:
        def bad(name, why):
            return ConfigError(f"train.{name}: {why}, got {getattr(self, name)!r}")

        def positive_int(name):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise bad(name, "must be a positive integer")

        for name in ("latent_dim", "epochs", "batch_size", "tile", "buffer_chunks", "patience",
                     "max_val_pixels"):
            positive_int(name)
        if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in self.widths):
            raise bad("widths", "must be positive integers")
        for name, options in (("loss", LOSSES), ("objective", OBJECTIVES), ("noise", NOISES),
                              ("device", DEVICES)):
            if getattr(self, name) not in options:
                raise bad(name, f"must be one of {options}")
        def number(name):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise bad(name, "must be a number")

        for name in ("lr", "val_fraction", "noise_level", "weight_decay"):
            number(name)
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if not self.lr > 0:
            raise bad("lr", "must be a positive number")
        if not 0 < self.val_fraction < 1:
            raise bad("val_fraction", "must be between 0 and 1")
        if not self.noise_level > 0 or (self.noise == "poisson" and not self.noise_level < 1):
            raise bad("noise_level", "must be positive (below 1 for poisson thinning)")
        if self.max_train_pixels is not None:
            positive_int("max_train_pixels")
        if self.threads is not None:
            positive_int("threads")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0):
            raise bad("seed", "must be a non-negative integer")
        if self.prefetch not in (None, True, False):
            raise bad("prefetch", "must be true, false or null (on CUDA only)")
        region = self.normal_region
        if region is not None and not (
                len(region) == 4 and all(isinstance(v, int) and v >= 0 for v in region)
                and region[0] < region[1] and region[2] < region[3]):
            raise bad("normal_region", "must be (y0, y1, x0, x1) with y0 < y1 and x0 < x1")
        if self.loss == "poisson" and self.model == "linear":
            raise ConfigError("train.loss: the linear autoencoder (the PCA check) trains with 'mse'")

    def hash(self, data: str = "") -> str:
        """What a checkpoint must match to be resumed: the settings that change the result (not
        threads, device or prefetch) and, given as ``data``, a signature of the training data."""
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("threads", "device", "prefetch")}
        blob = json.dumps([fields, data], sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# data


@contextlib.contextmanager
def _blosc_threads(use: bool):
    """Blosc's own decode threads: on for reads in the training thread (the steps wait anyway:
    30 ms per 64 MiB chunk against 48 without), off for a background reader, where they fight
    PyTorch's threads (0.90 s against 0.32 s for two chunks on 2 cores)."""
    import numcodecs.blosc

    old = numcodecs.blosc.use_threads
    numcodecs.blosc.use_threads = use
    try:
        yield
    finally:
        numcodecs.blosc.use_threads = old


def _uniform_hash(v: np.ndarray, seed: int) -> np.ndarray:
    """Uniform numbers in [0, 1) from integers and a seed (splitmix64's finaliser, top 53 bits)."""
    with np.errstate(over="ignore"):
        v = v + np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
        v = (v ^ (v >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        v = (v ^ (v >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        v = v ^ (v >> np.uint64(31))
    return (v >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_tiles(config: TrainConfig, nav_shape: tuple[int, int]) -> list[int]:
    """The ids of the tiles that hold training candidates: all of the scan's, or those that meet
    the declared normal region."""
    ny, nx = nav_shape
    t = config.tile
    ry0, ry1, rx0, rx1 = config.normal_region or (0, ny, 0, nx)
    return [ty * (nx // t + 1) + tx for ty in range(math.ceil(ny / t))
            for tx in range(math.ceil(nx / t))
            if ty * t < ry1 and (ty + 1) * t > ry0 and tx * t < rx1 and (tx + 1) * t > rx0]


def check_split(config: TrainConfig, nav_shape: tuple[int, int]) -> None:
    """Refuse a split that cannot work on a scan of ``nav_shape`` pixels (before any training):
    training and validation need a tile each, inside the declared normal region if any."""
    ny, nx = nav_shape
    t, region = config.tile, config.normal_region
    if region is not None and (region[0] >= ny or region[2] >= nx):
        raise ConfigError(f"normal_region: {list(region)} lies outside the {ny} x {nx} scan")
    if len(split_tiles(config, nav_shape)) < 2:
        if region is None:
            raise ConfigError(f"train.tile: {t} leaves the {ny} x {nx} scan a single tile; "
                              "training and validation need two at least (lower train.tile)")
        raise ConfigError(f"normal_region: {list(region)} meets a single train.tile tile of {t} "
                          "pixels; training and validation need two at least (lower train.tile "
                          "or declare a larger region)")


class ChunkStream:
    """Training and validation pixels of a ``preprocess`` stage, streamed chunk by chunk."""

    def __init__(self, stage_path: str | os.PathLike, config: TrainConfig):
        path = Path(stage_path)
        if not (path / "zarr.json").exists() or not (path / "features" / "zarr.json").exists():
            raise StoreError(f"{path}: no preprocess stage with features (run preprocessing first)")
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        self.features = group["features"]
        self.valid = group["valid"] if "valid" in group else None
        # the clean target is read only when the objective uses it
        wants_clean = config.objective == "denoise" and config.noise in ("auto", "clean")
        self.clean = group["clean_features"] if wants_clean and "clean_features" in group else None
        self.config = config
        self.prefetch = bool(config.prefetch) if config.prefetch is not None else _cuda_in_use(config)
        ny, nx = self.features.shape[:2]
        self.signal_shape = tuple(self.features.shape[2:])
        self.n_features = int(np.prod(self.signal_shape))
        cy, cx = self.features.chunks[:2]
        self.chunks = [(y0, min(y0 + cy, ny), x0, min(x0 + cx, nx))
                       for y0 in range(0, ny, cy) for x0 in range(0, nx, cx)]
        self.nav_shape = (ny, nx)
        self.path = path
        self._selections: dict = {}
        self._resident: dict = {}
        self._validation = None
        # tiles are validation below a hash threshold, drawn over the candidate tiles (those of
        # a declared region, which must get validation tiles of its own); at least one tile
        # goes to each part
        check_split(config, (ny, nx))
        t = config.tile
        n_tiles = (ny // t + 1) * (nx // t + 1)
        u_all = _uniform_hash(np.arange(n_tiles, dtype=np.uint64), config.seed)
        u_real = np.sort(u_all[split_tiles(config, (ny, nx))])
        n_val = int(np.clip((u_real < config.val_fraction).sum(), 1, len(u_real) - 1))
        self._val_threshold = u_real[n_val - 1]
        self.stride = 1
        if config.max_train_pixels:
            n_train = ny * nx * (1 - config.val_fraction)
            self.stride = max(1, math.ceil(math.sqrt(n_train / config.max_train_pixels)))

    def signature(self) -> str:
        """The training data's identity for checkpoints: shape, chunks and the stage's attrs."""
        attrs = zarr.open_group(str(self.path), mode="r", zarr_format=3).attrs
        return json.dumps([list(self.features.shape), list(self.features.chunks),
                           attrs.get("preprocess"), attrs.get("source")], sort_keys=True, default=str)

    def split(self, y0, y1, x0, x1) -> np.ndarray:
        """0 = train, 1 = validation, by seeded spatial tiles; 2 = left out (by the sample grid, or
        outside ``normal_region``)."""
        t = self.config.tile
        yy, xx = np.mgrid[y0:y1, x0:x1]
        tile_id = (yy // t) * (self.nav_shape[1] // t + 1) + xx // t
        # a fixed hash of (seed, tile): the same tiles are validation in every epoch and run
        u = _uniform_hash(tile_id.astype(np.uint64), self.config.seed)
        out = (u <= self._val_threshold).astype(np.int8)
        region = self.config.normal_region
        if region is not None:  # outside the declared normal region: neither train nor validation
            ry0, ry1, rx0, rx1 = region
            out[~((yy >= ry0) & (yy < ry1) & (xx >= rx0) & (xx < rx1))] = 2
        if self.stride > 1:
            grid = (yy % self.stride == 0) & (xx % self.stride == 0)
            out[(out == 0) & ~grid] = 2
        return out.ravel()

    def selection(self, chunk, part: int) -> np.ndarray:
        """Pixels of ``chunk`` in ``part`` that are valid (cached: a bool per pixel)."""
        key = (chunk, part)
        if key not in self._selections:
            y0, y1, x0, x1 = chunk
            sel = self.split(y0, y1, x0, x1) == part
            if self.valid is not None:
                sel &= np.asarray(self.valid[y0:y1, x0:x1]).ravel().astype(bool)
            self._selections[key] = sel
        return self._selections[key]

    def read(self, chunk, part: int) -> tuple[np.ndarray, np.ndarray | None]:
        y0, y1, x0, x1 = chunk
        sel = self.selection(chunk, part)
        x = np.asarray(self.features[y0:y1, x0:x1], np.float32).reshape(-1, self.n_features)[sel]
        clean = None
        if self.clean is not None:
            clean = np.asarray(self.clean[y0:y1, x0:x1], np.float32).reshape(-1, self.n_features)[sel]
        return x, clean

    def _read_into(self, array, chunk, sel, scratch, out) -> None:
        """The selected pixels of one chunk into ``out``, through a reused ``scratch`` chunk buffer:
        zarr decodes into memory already touched, so no 64 MiB chunk is freshly page-faulted
        (45 ms a chunk against 50-110 ms)."""
        from zarr.core.buffer import default_buffer_prototype

        y0, y1, x0, x1 = chunk
        n = (y1 - y0) * (x1 - x0)
        view = scratch[:n].reshape(y1 - y0, x1 - x0, *self.signal_shape)
        array.get_basic_selection((slice(y0, y1), slice(x0, x1)),
                                  out=default_buffer_prototype().nd_buffer.from_numpy_array(view))
        np.compress(sel, scratch[:n], axis=0, out=out)

    def _group_buffers(self, head: int) -> dict:
        """Reused buffers for one group: ``head`` free rows in front (for the carried partial
        batch), then room for ``buffer_chunks`` chunks; a scratch chunk; the same for ``clean``."""
        cy, cx = self.features.chunks[:2]
        rows = head + self.config.buffer_chunks * cy * cx
        shape = lambda n: (n, self.n_features)  # noqa: E731
        return {"x": np.empty(shape(rows), np.float32), "scratch": np.empty(shape(cy * cx), np.float32),
                "c": None if self.clean is None else np.empty(shape(rows), np.float32),
                "head": head}

    def _read_group(self, chunks, part, buffers):
        """The group's selected pixels, read into ``buffers`` behind its head room: (x, clean, n)."""
        off = buffers["head"]
        for chunk in chunks:
            sel = self.selection(chunk, part)
            n = int(sel.sum())
            self._read_into(self.features, chunk, sel, buffers["scratch"], buffers["x"][off:off + n])
            if self.clean is not None:
                self._read_into(self.clean, chunk, sel, buffers["scratch"], buffers["c"][off:off + n])
            off += n
        return buffers, off

    def batches(self, part: int, epoch: int | None, batch_size: int) -> Iterator[tuple[Any, Any]]:
        """Minibatches (CPU tensors) of ``part`` (0 train, 1 validation). With ``epoch`` the chunk order and the
        pixels within each group of ``buffer_chunks`` chunks are shuffled by (seed, epoch). Groups
        are read into two reused buffers (no fresh allocation per chunk); with ``prefetch`` a
        background thread fills one while the other is consumed. The last partial batch of a
        shuffled group is carried into the head room in front of the next one (less than one
        batch), so memory stays bounded: two groups and a scratch chunk."""
        from concurrent.futures import ThreadPoolExecutor

        order = np.arange(len(self.chunks))
        rng = None
        if epoch is not None:
            rng = np.random.default_rng([self.config.seed, epoch])
            rng.shuffle(order)
        size = self.config.buffer_chunks
        groups = [[self.chunks[i] for i in order[g:g + size]] for g in range(0, len(order), size)]
        if len(groups) == 1:  # the whole part fits in the buffer: read it once, in chunk order
            if part not in self._resident:
                buffers, end = self._read_group(sorted(groups[0]), part, self._group_buffers(0))
                self._resident[part] = (buffers["x"][:end], None if self.clean is None
                                        else buffers["c"][:end])
            yield from self._yield_group(*self._resident[part], rng, batch_size, last=True)
            return
        pair = [self._group_buffers(batch_size), self._group_buffers(batch_size)]
        carry_x = carry_c = None
        with _blosc_threads(not self.prefetch), ThreadPoolExecutor(1) as pool:
            read = (lambda gi: pool.submit(self._read_group, groups[gi], part, pair[gi % 2])) \
                if self.prefetch else None
            pending = read(0) if self.prefetch else None
            for gi in range(len(groups)):
                if self.prefetch:
                    buffers, end = pending.result()
                    if gi + 1 < len(groups):
                        pending = read(gi + 1)
                else:
                    buffers, end = self._read_group(groups[gi], part, pair[gi % 2])
                start = buffers["head"]
                if carry_x is not None:  # the carried rows go just in front of the group
                    start -= len(carry_x)
                    buffers["x"][start:start + len(carry_x)] = carry_x
                    if carry_c is not None:
                        buffers["c"][start:start + len(carry_c)] = carry_c
                x = buffers["x"][start:end]
                c = None if self.clean is None else buffers["c"][start:end]
                # an ordered pass just yields its last partial batch
                last = gi + 1 == len(groups) or rng is None
                carry_x, carry_c = yield from self._yield_group(x, c, rng, batch_size, last)

    @staticmethod
    def _yield_group(x, c, rng, batch_size, last):
        """Yield ``x``'s batches (shuffled when ``rng``); return the copied rest unless ``last``."""
        import torch

        idx = rng.permutation(len(x)) if rng is not None else np.arange(len(x))
        stop = len(x) if last else len(x) // batch_size * batch_size
        # gathers by torch (multithreaded, GIL released), not numpy fancy indexing; the gathered
        # batch is a copy, so the buffer may be refilled once it is consumed
        xt, ct = torch.from_numpy(x), None if c is None else torch.from_numpy(c)
        it = torch.from_numpy(idx)
        for s in range(0, stop, batch_size):
            b = it[s:s + batch_size]
            yield xt[b], None if ct is None else ct[b]
        rest = idx[stop:]
        if not len(rest):
            return None, None
        return x[rest], None if c is None else c[rest]

    def validation_set(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The validation pixels, read once and kept: at most ``max_val_pixels`` of them (evenly
        spaced over the scan, picked chunk by chunk), so memory stays bounded and no epoch
        re-reads the scan to validate."""
        if self._validation is None:
            counts = np.array([int(self.selection(c, 1).sum()) for c in self.chunks])
            total = int(counts.sum())
            if total == 0:
                raise ConfigError("train.val_fraction: no validation pixel (the scan is smaller "
                                  "than a few train.tile tiles; lower train.tile)")
            keep = np.linspace(0, total - 1, min(total, self.config.max_val_pixels)).astype(np.int64)
            starts = np.concatenate([[0], np.cumsum(counts)])
            xs, cs = [], []
            for i, chunk in enumerate(self.chunks):
                local = keep[(keep >= starts[i]) & (keep < starts[i + 1])] - starts[i]
                if len(local):
                    x, c = self.read(chunk, 1)
                    xs.append(x[local])
                    cs.append(None if c is None else c[local])
            self._validation = (np.concatenate(xs),
                                None if self.clean is None else np.concatenate(cs))
        return self._validation

    def moments(self) -> tuple[np.ndarray, float]:
        """Per-feature mean and one overall standard deviation of the training pixels (one pass,
        float64 sums)."""
        n, s, ss = 0, np.zeros(self.n_features), 0.0
        for x, _ in self.batches(0, None, 1 << 16):
            x = x.numpy()
            n += len(x)
            s += x.sum(axis=0, dtype=np.float64)
            ss += float(np.einsum("ij,ij->", x, x, dtype=np.float64))
        if n < 2:
            raise ConfigError(f"train: only {n} valid training pixel(s); lower "
                              "train.val_fraction or give a larger scan")
        mean = s / n
        var = max(ss / n - float(mean @ mean), 0.0) / self.n_features
        return mean.astype(np.float32), max(math.sqrt(var), 1e-12)


# ---------------------------------------------------------------------------------------------
# training


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
    extra: dict = field(default_factory=dict)


def _cuda_in_use(config: TrainConfig) -> bool:
    # on a CPU the steps use every core, and a background reader only slows them down (measured:
    # 73-76 % of the in-memory rate with it, 76-81 % without); a GPU leaves the CPU free to read
    if config.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def pick_device(config: TrainConfig):
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' asked for but no CUDA device is available")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if not use_cuda and config.threads:
        torch.set_num_threads(config.threads)
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

    def loss(self, out, target):
        import torch

        if self.config.loss == "poisson":
            return torch.nn.functional.poisson_nll_loss(out + self.log_rest, torch.clamp(target, min=0),
                                                        log_input=True, full=False)
        return torch.nn.functional.mse_loss(out, target)

    def reconstruct(self, out):
        import torch

        return torch.exp(out) if self.config.loss == "poisson" else out * self.scale + self.mean


def _seed(seed: int, epoch: int, stream: int) -> int:
    """Independent seeds for (run seed, epoch, stream): 0 training draws, 1 validation noise."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def _save_atomic(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_autoencoder(stage_path: str | os.PathLike, config: TrainConfig | None = None, *,
                      checkpoint_dir: str | os.PathLike | None = None,
                      stop_after_epoch: int | None = None) -> TrainResult:
    """Train on a ``preprocess`` stage directory; resume from ``checkpoint_dir`` if it holds a
    checkpoint of the same config. ``stop_after_epoch`` ends the run early as a kill would
    (tests)."""
    import torch

    from emscale.models import build_model

    config = config or TrainConfig()
    config.check()
    stream = ChunkStream(stage_path, config)
    key = config.hash(stream.signature())
    if stream.clean is None and config.objective == "denoise" and config.noise == "clean":
        raise ConfigError("train.noise: 'clean' needs a stage with clean_features")
    shape = stream.signal_shape if config.model == "conv" else (stream.n_features,)
    device = pick_device(config)
    torch.manual_seed(config.seed)
    model = build_model(config.model, tuple(shape), config.latent_dim, tuple(config.widths)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "lr": [], "seconds": []}
    best = {"val": math.inf, "epoch": -1, "state": None}
    bad_epochs, start = 0, 0
    mean, scale = None, None
    ckpt = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir else None
    resumed_from = None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state["config_hash"] != key:
            raise ConfigError(f"{ckpt}: checkpoint of another training config or stage "
                              f"({state['config_hash']} != {key}); remove it to restart")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = {k: list(v) for k, v in state["history"].items()}
        best = {"val": float(state["best_val"]), "epoch": int(state["best_epoch"]),
                "state": state["best_state"]}
        bad_epochs, start = int(state["bad_epochs"]), int(state["epoch"]) + 1
        mean, scale = state["mean"].cpu().numpy(), float(state["scale"])
        resumed_from = start - 1
        log.info("resuming %s from epoch %d", ckpt, resumed_from)
    if mean is None:
        mean, scale = stream.moments()
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
        gen = torch.Generator().manual_seed(_seed(config.seed, epoch, 0))
        model.train()
        total, count = 0.0, 0
        for x, clean in stream.batches(0, epoch, config.batch_size):
            inp, target = objective.batch(x, clean, gen)
            out, _ = model(inp)
            loss = objective.loss(out, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
            count += len(x)
        seen += count
        train_time += time.perf_counter() - t0  # the training steps only, for samples/s
        history["lr"].append(float(opt.param_groups[0]["lr"]))
        sched.step()
        val = evaluate_loss(model, stream, objective, config.batch_size, gen_seed=config.seed)
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
            _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "epoch": epoch,
                          "config_hash": key, "history": history,
                          "best_val": best["val"], "best_epoch": best["epoch"],
                          "best_state": best["state"], "bad_epochs": bad_epochs,
                          "mean": torch.as_tensor(mean), "scale": scale}, ckpt)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        if bad_epochs >= config.patience:
            log.info("early stop at epoch %d (best %d)", epoch, best["epoch"])
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return TrainResult(model=model, history=history, best_epoch=best["epoch"], mean=mean,
                       scale=scale, config=config, device=str(device),
                       samples_per_s=seen / train_time if train_time else float("nan"),
                       resumed_from=resumed_from)


def evaluate_loss(model, stream: ChunkStream, objective: _Objective, batch_size: int,
                  gen_seed: int = 0) -> float:
    """Mean loss over the validation set (noise drawn the same way every epoch)."""
    import torch

    gen = torch.Generator().manual_seed(_seed(gen_seed, 0, 1))
    model.eval()
    total, count = 0.0, 0
    x_all, clean_all = stream.validation_set()
    with torch.no_grad():
        for s in range(0, len(x_all), max(batch_size, 4096)):
            x = x_all[s:s + max(batch_size, 4096)]
            clean = None if clean_all is None else clean_all[s:s + max(batch_size, 4096)]
            inp, target = objective.batch(x, clean, gen)
            out, _ = model(inp)
            total += float(objective.loss(out, target)) * len(x)
            count += len(x)
    model.train()
    return total / count if count else float("nan")


# ---------------------------------------------------------------------------------------------
# the stage


def write_train_stage(results, result: TrainResult, *, overwrite: bool = False):
    """The ``train`` stage group: loss curves per epoch; the config, its hash and the best epoch
    in attrs; and the best weights as plain arrays (``weights``, one float32 vector with the layout
    in its attrs, and ``feature_mean``/``scale``, the standardisation), so that loading a model
    never unpickles anything. ``load_model(stage)`` rebuilds it."""
    import xarray as xr

    h = result.history
    state = result.model.state_dict()
    layout, flat, offset = [], [], 0
    for name, tensor in state.items():
        values = tensor.detach().cpu().numpy().astype(np.float32).ravel()
        layout.append({"name": name, "shape": list(tensor.shape), "offset": offset})
        flat.append(values)
        offset += values.size
    ds = xr.Dataset(
        {"train_loss": (("epoch",), np.asarray(h["train_loss"], np.float64)),
         "val_loss": (("epoch",), np.asarray(h["val_loss"], np.float64)),
         "learning_rate": (("epoch",), np.asarray(h["lr"], np.float64)),
         "epoch_seconds": (("epoch",), np.asarray(h["seconds"], np.float64)),
         "weights": (("parameter",), np.concatenate(flat), {"layout": layout}),
         "feature_mean": (("feature",), np.asarray(result.mean, np.float32), {"scale": result.scale})},
        coords={"epoch": np.arange(len(h["train_loss"]))},
        attrs={"train": {"config": dataclasses.asdict(result.config),
                         "config_hash": result.config.hash(), "best_epoch": result.best_epoch,
                         "device": result.device,
                         "samples_per_s": (result.samples_per_s
                                           if math.isfinite(result.samples_per_s) else None),
                         "resumed_from": result.resumed_from}},
    )
    ds.attrs = json.loads(json.dumps(ds.attrs, default=list))
    ds["weights"].attrs = json.loads(json.dumps(ds["weights"].attrs, default=int))
    return results.write_stage("train", ds, overwrite=overwrite)


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A trained model in portable form: its config, flat float32 weights with their layout, and
    the standardisation. Small and picklable (no torch object, nothing unpickled on load), so a
    dask graph carries it to each worker once; ``model()`` builds the torch module once per
    process and caches it."""

    config: dict
    signal_shape: tuple
    weights: np.ndarray
    layout: tuple
    mean: np.ndarray
    scale: float

    @classmethod
    def from_train_stage(cls, train_stage, signal_shape: tuple[int, ...]) -> "ModelSpec":
        return cls(config=dict(train_stage.attrs["train"]["config"]),
                   signal_shape=tuple(int(n) for n in signal_shape),
                   weights=np.asarray(train_stage["weights"].values, np.float32),
                   layout=tuple(dict(item) for item in train_stage["weights"].attrs["layout"]),
                   mean=np.asarray(train_stage["feature_mean"].values, np.float32),
                   scale=float(train_stage["feature_mean"].attrs["scale"]))

    @property
    def token(self) -> str:
        if "_token" not in self.__dict__:
            h = hashlib.sha256(self.weights.tobytes())
            h.update(json.dumps([self.config, self.signal_shape, self.scale], sort_keys=True,
                                default=list).encode())
            h.update(self.mean.tobytes())
            object.__setattr__(self, "_token", h.hexdigest()[:24])
        return self.__dict__["_token"]

    def __dask_tokenize__(self):
        return ("ModelSpec", self.token)

    @property
    def poisson(self) -> bool:
        return self.config.get("loss") == "poisson"

    def build(self):
        """A new torch module with these weights (eval mode)."""
        import torch

        from emscale.models import build_model

        cfg = self.config
        shape = self.signal_shape if cfg["model"] == "conv" else (int(np.prod(self.signal_shape)),)
        model = build_model(cfg["model"], tuple(shape), int(cfg["latent_dim"]), tuple(cfg["widths"]))
        state = {}
        for item in self.layout:
            n = int(np.prod(item["shape"])) if item["shape"] else 1
            chunk = self.weights[item["offset"]: item["offset"] + n].reshape(item["shape"])
            state[item["name"]] = torch.from_numpy(chunk.copy())
        model.load_state_dict(state)
        model.eval()
        return model

    def model(self):
        """The torch module, built once per process (workers reuse it across tasks)."""
        if self.token not in _MODEL_CACHE:
            _MODEL_CACHE.clear()  # one model at a time per process: memory stays bounded
            _MODEL_CACHE[self.token] = self.build()
            MODEL_BUILDS[0] += 1
        return _MODEL_CACHE[self.token]


_MODEL_CACHE: dict = {}
MODEL_BUILDS = [0]  # how many models this process has built (tests: once per worker)


def load_model(train_stage, signal_shape: tuple[int, ...]):
    """The trained model of a ``train`` stage Dataset, with its mean and scale."""
    spec = ModelSpec.from_train_stage(train_stage, signal_shape)
    return spec.build(), spec.mean, spec.scale


def train_on_cluster(client, stage_path, config: TrainConfig, **kwargs) -> TrainResult:
    """Run the training in one worker process, the one with a ``GPU`` resource if any worker
    declares one; it reads the Zarr chunks itself (shared storage), so no data pass through the
    client or the scheduler."""
    info = client.scheduler_info()["workers"]
    gpu = any(w.get("resources", {}).get("GPU") for w in info.values())
    future = client.submit(train_autoencoder, str(stage_path), config, pure=False,
                           resources={"GPU": 1} if gpu else None, key=f"train-{config.hash()}",
                           **kwargs)
    return future.result()
