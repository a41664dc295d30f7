"""The ``encode`` stage: every pixel through the trained autoencoder, blockwise on the cluster.

``encode_stage(features, spec)`` gives, per pixel, the latent code (``latent``), the autoencoder's
reconstruction error (``recon_error``: the chi-square per feature for scaled counts, else the
mean squared residual; see ``error_metric``), optionally the decoder's output (``denoised``),
and, given the fitted PCA, the PCA reconstruction error at the same k (``pca_recon_error``;
in a run, rebuilt from the PCA stage's scores, not projected again), all in one pass over the
features:
one task per navigation block. The model travels as one graph key (``ModelSpec``), fetched once
per worker and built once per worker process. Invalid pixels get NaN.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import ClassVar, Literal

import dask.array as da
import numpy as np
import xarray as xr
from pydantic import Field

from emscale.blockwise import map_nav_blocks
from emscale.config import Section, defaults_of
from emscale.errors import ConfigError
from emscale.model_spec import ModelSpec
from emscale.stages.base import SIGNAL, Context, Output, Stage
from emscale.store import NAV_DIMS

log = logging.getLogger(__name__)



class EncodeConfig(Section):
    """The ``encode`` section."""

    name: ClassVar[str] = "encode"

    denoised: bool = Field(False, description=
        'also write the denoised scan (as large as the features)')
    error: Literal["auto", "poisson", "mse"] = Field("auto", description=
        'reconstruction error; auto: Poisson chi-square while the features are scaled counts, '
        'else MSE')


_DEFAULTS = defaults_of(EncodeConfig)
ERROR_NAMES = {"poisson": "chi-square per feature (squared residual over the Poisson variance)",
               "mse": "mean squared residual over the features"}
INFERENCE_ROWS = 2048  # rows per forward pass: GEMM-efficient, temporaries of 8 MiB (MLP)
# a torch model's intermediate outputs per forward pass: a conv model's first layer holds
# channels x (pattern / 2)^2 floats per row (1 MiB at 256 channels on 64 x 64 patterns), so
# 2048 rows of it took a 6 GiB worker past its limit
ACTIVATION_BUDGET = 256 * 2**20


class PCAProjection:
    """A fitted PCA's mean and first ``k`` axes, as one graph constant."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, k: int):
        self.mean = np.asarray(mean, np.float32).ravel()
        self.components = np.ascontiguousarray(np.asarray(components, np.float32)
                                               .reshape(len(components), -1)[:k])
        self.k = int(k)

    @classmethod
    def from_pca_stage(cls, pca: xr.Dataset, k: int) -> "PCAProjection":
        n = pca.sizes["component"]
        if not 1 <= k <= n:
            raise ConfigError(f"encode: the PCA stage has {n} components; cannot compare at k={k}")
        return cls(pca["pca_mean"].values, pca["pca_components"].values, k)

    def __dask_tokenize__(self):
        return ("PCAProjection", self.mean.tobytes(), self.components.tobytes())

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """mean + (x - mean) V^T V, as x V^T V + (mean - mean V^T V): one pass fewer."""
        if not hasattr(self, "_offset"):
            self._offset = self.mean - (self.mean @ self.components.T) @ self.components
        rec = (x @ self.components.T) @ self.components
        rec += self._offset
        return rec

    def reconstruct_scores(self, scores: np.ndarray) -> np.ndarray:
        """mean + scores V from the PCA stage's scores ((x - mean) V^T, its first k columns):
        the projection is not computed again (a thin GEMM that took a tenth of encoding)."""
        rec = np.asarray(scores, np.float32)[:, :self.k] @ self.components
        rec += self.mean
        return rec


# steps after which the features are counts divided by the per-pixel ``intensity``, so that the
# Poisson variance of a feature is (its expected value) / intensity
COUNT_STEPS = {"crop", "bin", "mask_channels", "normalize"}


def error_metric(features: xr.Dataset, error: str) -> str:
    """``"poisson"`` (chi-square per feature: residual^2 over the Poisson variance) or ``"mse"``.
    ``"auto"`` takes poisson when the preprocessing kept counts (only crop, bin, mask_channels
    and normalize, whose divisor is the stage's ``intensity``), mse otherwise (e.g. after
    anscombe or poisson_weight, whose noise is already of unit variance)."""
    steps = [st.get("step") for st in features.attrs.get("preprocess", {}).get("steps", [])]
    counts = set(steps) <= COUNT_STEPS and "intensity" in features
    if error == "auto":
        return "poisson" if counts else "mse"
    EncodeConfig.of("encode", error=error)
    if error == "poisson" and not counts:
        raise ConfigError(f"encode.error: 'poisson' needs features that are scaled counts (steps "
                          f"among {sorted(COUNT_STEPS)}), the chain has {steps}")
    return error


def residual_error(x, rec, intensity, poisson: bool):
    """Per-pixel mean over features of the squared residual; with ``poisson`` divided by the
    Poisson variance in counts (at least one count: read noise), i.e. the chi-square per feature,
    about 1 for a pixel whose residual is noise. In counts, (s (rec - x))^2 / max(s rec, 1) is
    s (rec - x)^2 / max(rec, 1/s): four passes over the block, two temporaries."""
    r2 = np.subtract(rec, x, dtype=np.float32)
    np.square(r2, out=r2)
    if not poisson:
        return r2.mean(axis=1, dtype=np.float32)
    s = np.asarray(intensity, np.float32).reshape(-1, 1)
    r2 /= np.maximum(rec, 1.0 / s)
    return (r2.mean(axis=1, dtype=np.float32) * s[:, 0]).astype(np.float32)


class DenseInference:
    """An MLP or linear autoencoder evaluated with numpy GEMMs: OpenBLAS's sgemm ran at 234
    GFLOP/s on one AVX-512 core here against 100 for PyTorch's, and inference is GEMM-bound. The
    standardisation is folded into the first and last layers (two passes over the block fewer);
    GELU stays PyTorch's (exact erf form, as trained). Built once per process from a spec."""

    def __init__(self, spec: ModelSpec):
        model = spec.model()
        enc, dec = _dense_layers(model.encoder), _dense_layers(model.decoder)
        if enc is None or dec is None:
            raise TypeError(f"{type(model).__name__} is not made of Linear and GELU layers")
        w, b = enc[0][1], enc[0][2]  # first layer on (x - mean) / scale
        enc[0] = ("linear", w / spec.scale, b - (spec.mean @ w) / spec.scale)
        if not spec.poisson:  # last layer back to feature units: y * scale + mean
            w, b = dec[-1][1], dec[-1][2]
            dec[-1] = ("linear", w * spec.scale, b * spec.scale + spec.mean)
        self.encoder, self.decoder, self.poisson = enc, dec, spec.poisson
        self.path_in = self.path_out = None
        if model.pca_path:  # the linear maps beside the network, on the same folding
            w_in = model.path_in.weight.detach().numpy().astype(np.float32).T
            self.path_in = (np.ascontiguousarray(w_in / spec.scale),
                            -(spec.mean @ w_in) / spec.scale)
            w_out = model.path_out.weight.detach().numpy().astype(np.float32).T
            self.path_out = np.ascontiguousarray(w_out if spec.poisson else w_out * spec.scale)

    @staticmethod
    def _run(layers, h):
        import torch

        for op in layers:
            if op[0] == "linear":
                h = h @ op[1]
                h += op[2]
            else:
                h = torch.nn.functional.gelu(torch.from_numpy(h)).numpy()
        return h

    def encode(self, x):
        z = self._run(self.encoder, x)
        if self.path_in is not None:
            z += x @ self.path_in[0]
            z += self.path_in[1]
        return z

    def decode(self, z):
        y = self._run(self.decoder, z)
        if self.path_out is not None:
            y += z @ self.path_out
        return np.exp(y, out=y) if self.poisson else y


def _dense_layers(module):
    """[("linear", W^T float32 contiguous, bias), ("gelu",)...] or None for other layers."""
    import torch

    modules = list(module) if isinstance(module, torch.nn.Sequential) else [module]
    out = []
    for m in modules:
        if isinstance(m, torch.nn.Linear):
            w = m.weight.detach().numpy().astype(np.float32).T.copy()
            b = (m.bias.detach().numpy().astype(np.float32) if m.bias is not None
                 else np.zeros(w.shape[1], np.float32))
            out.append(("linear", w, b))
        elif isinstance(m, torch.nn.GELU) and m.approximate == "none":
            out.append(("gelu",))
        else:
            return None
    return out


_RUNNERS: dict = {}


def _runner(spec: ModelSpec):
    """The fastest evaluator of the spec's model in this process: on a worker with a CUDA
    device, the torch module there; else ``DenseInference`` for MLP and linear models, or the
    torch module on the CPU (conv). None: the torch module (``_torch_forward``)."""
    if spec.token not in _RUNNERS:
        _RUNNERS.clear()
        try:
            _RUNNERS[spec.token] = None if _cuda() else DenseInference(spec)
        except TypeError:
            _RUNNERS[spec.token] = None
    return _RUNNERS[spec.token]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _torch_model(spec):
    """The spec's torch module on this process's device (moved there once per worker process)
    and the rows per forward pass that keep its intermediate outputs within ACTIVATION_BUDGET."""
    device = "cuda" if _cuda() else "cpu"
    key = (spec.token, device)
    if key not in _RUNNERS:
        model = spec.model().to(device)
        _RUNNERS[key] = model, device, _rows_per_pass(model, spec, device)
    return _RUNNERS[key]


def _rows_per_pass(model, spec, device) -> int:
    """How many rows fit ACTIVATION_BUDGET: every leaf module's output counted (an upper bound:
    inference frees each once the next layer has read it), measured on one row."""
    import torch

    floats = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: floats.append(out.numel()))
             for m in model.modules() if not any(m.children())]
    try:
        with torch.inference_mode():
            model.decode(model.encode(torch.zeros(1, int(np.prod(spec.signal_shape)),
                                                  device=device)))
    finally:
        for h in hooks:
            h.remove()
    return int(max(1, min(INFERENCE_ROWS, ACTIVATION_BUDGET // (4 * max(sum(floats), 1)))))


def _torch_forward(spec, x):
    import torch

    model, device, _ = _torch_model(spec)
    with torch.inference_mode():
        xb = torch.from_numpy(x).to(device)
        mean = torch.from_numpy(spec.mean).to(device)
        z = model.encode((xb - mean).mul_(1.0 / spec.scale))
        rec = spec.to_features(model.decode(z))
    return z.cpu().numpy(), rec.cpu().numpy()


def encode_block(block, valid, intensity, spec: ModelSpec, pca: PCAProjection | None = None,
                 scores=None, *, denoised: bool = False, poisson: bool = False):
    """(latent, recon_error[, pca_recon_error][, denoised]) of one navigation block; PCA's
    reconstruction from the block's ``scores`` (y, x, >= k) where the PCA stage's are given,
    else projected here."""
    by, bx = block.shape[:2]
    n = by * bx
    x = np.ascontiguousarray(block, np.float32).reshape(n, -1)
    s_all = np.asarray(intensity, np.float32).ravel()
    if scores is not None:
        scores = np.asarray(scores).reshape(n, -1)
    dense = _runner(spec)
    step = INFERENCE_ROWS if dense is not None else _torch_model(spec)[2]
    k = spec.latent_dim
    latent = np.empty((n, k), np.float32)
    err = np.empty(n, np.float32)
    pca_err = np.empty(n, np.float32) if pca is not None else None
    out = np.empty_like(x) if denoised else None
    for s in range(0, n, step):
        rows = slice(s, s + step)
        xb = x[rows]
        if dense is not None:
            z = dense.encode(xb)
            rec = dense.decode(z)
        else:
            z, rec = _torch_forward(spec, xb)
        latent[rows] = z
        err[rows] = residual_error(xb, rec, s_all[rows], poisson)
        if pca is not None:
            pca_rec = pca.reconstruct(xb) if scores is None else \
                pca.reconstruct_scores(scores[rows])
            pca_err[rows] = residual_error(xb, pca_rec, s_all[rows], poisson)
        if out is not None:
            out[rows] = rec
    results = [r for r in (latent, err, pca_err, out) if r is not None]
    bad = ~np.asarray(valid, bool).ravel()
    if bad.any():
        for r in results:
            r[bad] = np.nan
    tails = [block.shape[2:] if r is out else r.shape[1:] for r in results]
    return tuple(r.reshape(by, bx, *t) for r, t in zip(results, tails))


def _encode_scored_block(block, valid, intensity, scores, spec, pca, **options):
    return encode_block(block, valid, intensity, spec, pca, scores, **options)


def encode_stage(features: xr.Dataset, spec: ModelSpec, *, pca: PCAProjection | None = None,
                 pca_scores: xr.DataArray | None = None,
                 denoised: bool = _DEFAULTS["denoised"], error: str = _DEFAULTS["error"]
                 ) -> xr.Dataset:
    """The ``encode`` stage Dataset (lazy) of a ``preprocess`` stage: ``latent`` (y, x,
    latent_dim), ``recon_error`` (y, x), ``pca_recon_error`` (y, x) when ``pca`` is given
    (compare at the same k: ``PCAProjection.from_pca_stage(pca_stage, latent_dim)``; with
    ``pca_scores``, the PCA stage's (y, x, component), reconstructed from those rather than
    projected again), and ``denoised`` (y, x, feature...) when asked. Both errors use
    ``error_metric(features, error)``."""
    feats = features["features"]
    sig_dims = feats.dims[2:]
    sig_shape = tuple(feats.shape[2:])
    if tuple(spec.signal_shape) != sig_shape:
        raise ConfigError(f"encode: the model was trained on signals of shape "
                          f"{tuple(spec.signal_shape)}, the features have {sig_shape}")
    metric = error_metric(features, error)
    nav_chunks = feats.data.chunks[:2]
    valid = (features["valid"].data if "valid" in features
             else da.ones(feats.shape[:2], bool, chunks=nav_chunks))
    intensity = (features["intensity"].data if "intensity" in features
                 else da.ones(feats.shape[:2], np.float32, chunks=nav_chunks))
    k = spec.latent_dim
    outputs = [((k,), np.float32), ((), np.float32)]
    if pca is not None:
        outputs.append(((), np.float32))
    if denoised:
        outputs.append((sig_shape, np.float32))
    inputs, constants = [feats.data, valid, intensity], [spec]
    fn = partial(encode_block, denoised=denoised, poisson=metric == "poisson")
    if pca is not None and pca_scores is not None:
        # the scores' first k columns on the features' blocks (maps are read in merged blocks)
        scores = pca_scores.isel(component=slice(0, pca.k)).chunk(
            dict(zip(NAV_DIMS, nav_chunks)) | {"component": -1})
        inputs.append(scores.data)
        fn = partial(_encode_scored_block, denoised=denoised, poisson=metric == "poisson")
    arrays = map_nav_blocks(fn, inputs, outputs, name="encode",
                            constants=constants + ([pca] if pca is not None else []))
    variables = {"latent": ((*NAV_DIMS, "latent_dim"), arrays[0]),
                 "recon_error": (NAV_DIMS, arrays[1])}
    if pca is not None:
        variables["pca_recon_error"] = (NAV_DIMS, arrays[2], {"k": pca.k})
    if denoised:
        variables["denoised"] = ((*NAV_DIMS, *sig_dims), arrays[-1])
    coords = {d: features[d] for d in (*NAV_DIMS, *sig_dims) if d in features.coords}
    ds = xr.Dataset(variables, coords={**coords, "latent_dim": np.arange(k)},
                    attrs={"encode": {"model_token": spec.token, "latent_dim": k,
                                      "model": spec.config.get("model"),
                                      "loss": spec.config.get("loss"),
                                      "pca_k": None if pca is None else pca.k,
                                      "error": metric,
                                      "denoised": bool(denoised)}})
    ds["recon_error"].attrs["long_name"] = ("autoencoder reconstruction error: "
                                            + ERROR_NAMES[metric])
    if "label" in features:
        ds["label"] = features["label"]
    return ds


def write_encode_stage(results, features: xr.Dataset, spec: ModelSpec, *,
                       pca: PCAProjection | None = None, denoised: bool = _DEFAULTS["denoised"],
                       error: str = _DEFAULTS["error"], overwrite: bool = False,
                       progress: bool = False) -> xr.Dataset:
    """Encode the ``preprocess`` stage and write the ``encode`` stage group of ``results``."""
    ds = encode_stage(features, spec, pca=pca, denoised=denoised, error=error)
    return results.write_stage("encode", ds,
                               overwrite=overwrite, progress=progress)


def latent_dim(encoded: xr.Dataset) -> int:
    """The latent size of an ``encode`` stage (the one place it is read from: its attrs)."""
    return int(encoded.attrs["encode"]["latent_dim"])


def _build(ctx: Context) -> xr.Dataset:
    features, train, pca = ctx.input("preprocess"), ctx.input("train"), ctx.inputs.get("pca")
    spec = ModelSpec.from_train_stage(train, tuple(features["features"].shape[2:]))
    proj = None
    if pca is not None:
        n = pca.attrs["pca"]["n_components"]
        if spec.latent_dim > n:
            raise ConfigError(f"train.latent_dim: {spec.latent_dim} is more than the PCA "
                              f"stage's {n} components (pca.n_components): the comparison at "
                              "the same k needs as many")
        proj = PCAProjection.from_pca_stage(pca, spec.latent_dim)
    cfg = ctx.config
    return encode_stage(features, spec, pca=proj, denoised=cfg.denoised, error=cfg.error,
                        pca_scores=None if pca is None else pca["pca_scores"])


STAGE = Stage(
    name="encode", config=EncodeConfig, reads=("preprocess", "train", "pca"), build=_build,
    library=encode_stage, accelerated=True,
    about="every pixel through the autoencoder: latent codes and reconstruction errors, and "
          "PCA's error at the same k",
    outputs={
        "latent": Output((*NAV_DIMS, "latent_dim"), "the autoencoder's code (NaN: invalid)"),
        "recon_error": Output(NAV_DIMS, "autoencoder reconstruction error: chi-square per "
                              "feature (Poisson) or mean squared residual; attrs long_name"),
        "pca_recon_error": Output(NAV_DIMS, "PCA's error at the latent size, same metric; "
                                  "attrs k", when="the pca stage is read (always in a run)"),
        "denoised": Output((*NAV_DIMS, SIGNAL), "the decoder's output", when="denoised: true"),
        "label": Output(NAV_DIMS, "ground-truth phase id (copied)", when="a synthetic scan"),
    },
    attrs={"encode": "model_token, latent_dim, model, loss, pca_k, error (poisson or mse), "
                     "denoised"},
)
