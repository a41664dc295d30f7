"""A trained model in portable form, for encoding on the workers.

The ``train`` stage stores the weights as plain float32 arrays with their layout (nothing is
pickled); ``ModelSpec.from_train_stage`` reads them back, and the spec travels in a dask graph as
one key, fetched once per worker; ``model()`` builds the torch module once per worker process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np


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

    @property
    def latent_dim(self) -> int:
        return int(self.config["latent_dim"])

    def to_features(self, y):
        """The decoder's output ``y`` (a torch tensor) in feature units: it learned standardised
        features (MSE) or a log-rate (Poisson loss)."""
        import torch

        if self.poisson:
            return torch.exp(y)
        return y.mul_(self.scale).add_(torch.from_numpy(self.mean).to(y.device))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """The decoder's signals (n, features) for latent ``codes`` (n, latent_dim)."""
        import torch

        with torch.inference_mode():
            y = self.model().decode(torch.as_tensor(np.asarray(codes, np.float32)))
            return self.to_features(y).numpy()

    def build(self):
        """A new torch module with these weights (eval mode)."""
        import torch

        from emscale.models import build_model

        cfg = self.config
        shape = self.signal_shape if cfg["model"] == "conv" else (int(np.prod(self.signal_shape)),)
        model = build_model(cfg["model"], tuple(shape), int(cfg["latent_dim"]), tuple(cfg["widths"]),
                            variational=bool(cfg.get("variational", False)),
                            pca_path=bool(cfg.get("pca_path", False)))
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
