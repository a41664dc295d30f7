"""Blockwise encoding: every pixel through the trained autoencoder, on the cluster.

``encode_stage(features, spec)`` gives, per pixel, the latent code (``latent``), the autoencoder's
reconstruction error (``recon_error``: mean squared residual over the features, in the
preprocessed units), optionally the decoder's output (``denoised``), and, given the fitted PCA, the
PCA reconstruction error at the same k (``pca_recon_error``), all in one pass over the features:
one task per navigation block. The model travels as one graph key (``ModelSpec``), fetched once
per worker and built once per worker process. Invalid pixels get NaN.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import xarray as xr

from emscale.blockwise import map_nav_blocks
from emscale.errors import ConfigError
from emscale.store import NAV_DIMS
from emscale.train import ModelSpec

log = logging.getLogger(__name__)

INFERENCE_ROWS = 8192  # rows per forward pass: big enough for GEMM efficiency, small in memory


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

    def error(self, x: np.ndarray) -> np.ndarray:
        c = x - self.mean
        resid = c - (c @ self.components.T) @ self.components
        return np.einsum("ij,ij->i", resid, resid) / c.shape[1]


def encode_block(block, valid, spec: ModelSpec, pca: PCAProjection | None = None, *,
                 denoised: bool = False):
    """(latent, recon_error[, pca_recon_error][, denoised]) of one navigation block."""
    import torch

    by, bx = block.shape[:2]
    n = by * bx
    x = np.ascontiguousarray(block, np.float32).reshape(n, -1)
    model = spec.model()
    k = int(spec.config["latent_dim"])
    latent = np.empty((n, k), np.float32)
    err = np.empty(n, np.float32)
    out = np.empty_like(x) if denoised else None
    mean = torch.from_numpy(spec.mean)
    inv = 1.0 / spec.scale
    with torch.inference_mode():
        for s in range(0, n, INFERENCE_ROWS):
            xb = torch.from_numpy(x[s:s + INFERENCE_ROWS])
            z = model.encode((xb - mean).mul_(inv))
            y = model.decode(z)
            rec = torch.exp(y) if spec.poisson else y.mul_(spec.scale).add_(mean)
            latent[s:s + len(xb)] = z.numpy()
            err[s:s + len(xb)] = (rec - xb).square_().mean(dim=1).numpy()
            if out is not None:
                out[s:s + len(xb)] = rec.numpy()
    results = [latent, err]
    if pca is not None:
        results.append(pca.error(x).astype(np.float32))
    if out is not None:
        results.append(out)
    bad = ~np.asarray(valid, bool).ravel()
    if bad.any():
        for r in results:
            r[bad] = np.nan
    tails = [block.shape[2:] if r is out else r.shape[1:] for r in results]
    return tuple(r.reshape(by, bx, *t) for r, t in zip(results, tails))


def encode_stage(features: xr.Dataset, spec: ModelSpec, *, pca: PCAProjection | None = None,
                 denoised: bool = False) -> xr.Dataset:
    """The ``encode`` stage Dataset (lazy) of a ``preprocess`` stage: ``latent`` (y, x,
    latent_dim), ``recon_error`` (y, x), ``pca_recon_error`` (y, x) when ``pca`` is given
    (compare at the same k: ``PCAProjection.from_pca_stage(pca_stage, latent_dim)``), and
    ``denoised`` (y, x, feature...) when asked."""
    feats = features["features"]
    sig_dims = feats.dims[2:]
    sig_shape = tuple(feats.shape[2:])
    if tuple(spec.signal_shape) != sig_shape:
        raise ConfigError(f"encode: the model was trained on signals of shape "
                          f"{tuple(spec.signal_shape)}, the features have {sig_shape}")
    if "valid" in features:
        valid = features["valid"].data
    else:
        import dask.array as da

        valid = da.ones(feats.shape[:2], bool, chunks=feats.data.chunks[:2])
    k = int(spec.config["latent_dim"])
    outputs = [((k,), np.float32), ((), np.float32)]
    if pca is not None:
        outputs.append(((), np.float32))
    if denoised:
        outputs.append((sig_shape, np.float32))
    arrays = map_nav_blocks(partial(encode_block, denoised=denoised), [feats.data, valid], outputs,
                            name="encode", constants=[spec] + ([pca] if pca is not None else []))
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
                                      "denoised": bool(denoised)}})
    ds["recon_error"].attrs["long_name"] = "autoencoder reconstruction error (mean squared residual)"
    if "label" in features:
        ds["label"] = features["label"]
    return ds


def write_encode_stage(results, features: xr.Dataset, spec: ModelSpec, *,
                       pca: PCAProjection | None = None, denoised: bool = False,
                       overwrite: bool = False, progress: bool = False) -> xr.Dataset:
    """Encode the ``preprocess`` stage and write the ``encode`` stage group of ``results``."""
    return results.write_stage("encode", encode_stage(features, spec, pca=pca, denoised=denoised),
                               overwrite=overwrite, progress=progress)
