"""Autoencoders for spectra and diffraction patterns (PyTorch).

- ``mlp``: fully connected encoder ``features -> widths... -> latent`` and the mirror decoder, GELU
  between layers, no activation at the bottleneck or at the output.
- ``conv``: for patterns (ky, kx): strided 3x3 convolutions (GELU) down to a small map, a linear
  bottleneck, and the mirror with transposed convolutions. Patterns are padded to a multiple of
  2**len(channels) and cropped back.
- ``linear``: one linear map each way, no bias, on centred data: the sanity check, whose optimum
  spans PCA's subspace (Baldi & Hornik 1989).

``build_model(kind, input_shape, latent_dim, widths, variational=False, pca_path=False)`` makes one; every model
has ``encode``, ``decode`` and ``forward`` returning ``(reconstruction, latent)`` on ``(batch,
features)`` input (patterns are flattened too, so that the data path is the same for both kinds).

Variational (``mlp`` and ``conv``; Kingma and Welling 2014): a second head beside the encoder's last
layer gives the log-variance of each code; training decodes ``mean + sigma * noise`` and keeps the
KL divergence to N(0, 1) of each pixel in ``model.kl`` for the loss; ``encode`` gives the mean,
so encoding, clustering and the dense inference path are those of a plain autoencoder.

PCA path (``mlp`` and ``conv``): a linear map each way beside the network, set to the training
pixels' principal components, with the network's last layer each way set to zero: the code is the
PCA scores plus what the network adds, the reconstruction PCA's plus the network's correction. So
training starts exactly at PCA's reconstruction at ``latent_dim`` and moves only where the loss
falls (residual learning; the idea of ReZero's zero-initialised branches), instead of having to
find PCA's subspace again from random weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from emscale.errors import ConfigError

KINDS = ("mlp", "conv", "linear")


class Autoencoder(nn.Module):
    generator: torch.Generator | None = None  # the variational noise's (CPU) generator
    kl: torch.Tensor | None = None  # the last forward's KL divergence per pixel (variational)

    @property
    def variational(self) -> bool:
        return "log_var" in self._modules

    def make_variational(self) -> None:
        """Add the log-variance head beside the encoder's last (linear) layer."""
        self.log_var = nn.Linear(self.encoder[-1].in_features, self.encoder[-1].out_features)

    @property
    def pca_path(self) -> bool:
        return "path_in" in self._modules

    def make_pca_path(self, n_features: int, latent_dim: int) -> None:
        """Add the linear maps beside the network (set by ``start_at_pca``)."""
        self.path_in = nn.Linear(n_features, latent_dim, bias=False)
        self.path_out = nn.Linear(latent_dim, n_features, bias=False)

    def start_at_pca(self, components: torch.Tensor) -> None:
        """The PCA path on ``components`` (latent_dim, features; orthonormal rows, of the
        standardised features) and the network's last layer each way at zero: the model is then
        exactly PCA at latent_dim."""
        last_in = self.encoder[-1]
        last_out = [m for m in self.decoder if isinstance(m, (nn.Linear, nn.ConvTranspose2d))][-1]
        with torch.no_grad():
            self.path_in.weight.copy_(components)
            self.path_out.weight.copy_(components.T)
        # fixed: Adam's first steps move every weight by about the learning rate, which on
        # unit-norm components of a thousand features is a few per cent of each
        self.path_in.weight.requires_grad_(False)
        self.path_out.weight.requires_grad_(False)
        with torch.no_grad():
            for layer in (last_in, last_out):
                layer.weight.zero_()
                layer.bias.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(self._in(x))
        return z + self.path_in(x) if self.pca_path else z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        y = self._out(self.decoder(z))
        return y + self.path_out(z) if self.pca_path else y

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.variational:
            z = self.encode(x)
            return self.decode(z), z
        h = self.encoder[:-1](self._in(x))
        mean, log_var = self.encoder[-1](h), self.log_var(h).clamp(-12.0, 8.0)
        if self.pca_path:
            mean = mean + self.path_in(x)
        self.kl = 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var).sum(1)
        z = mean
        if self.training:
            noise = torch.randn(mean.shape, generator=self.generator).to(mean.device)
            z = mean + noise * torch.exp(0.5 * log_var)
        return self.decode(z), mean

    def _in(self, x):
        return x

    def _out(self, y):
        return y


class MLPAutoencoder(Autoencoder):
    def __init__(self, n_features: int, latent_dim: int, widths=(256, 64)):
        super().__init__()
        sizes = [n_features, *widths, latent_dim]
        enc: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            enc.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                enc.append(nn.GELU())
        dec: list[nn.Module] = []
        rev = sizes[::-1]
        for i, (a, b) in enumerate(zip(rev[:-1], rev[1:])):
            dec.append(nn.Linear(a, b))
            if i < len(rev) - 2:
                dec.append(nn.GELU())
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)


class LinearAutoencoder(Autoencoder):
    """Linear maps without bias; the data must be centred (the trainer centres them)."""

    def __init__(self, n_features: int, latent_dim: int):
        super().__init__()
        self.encoder = nn.Linear(n_features, latent_dim, bias=False)
        self.decoder = nn.Linear(latent_dim, n_features, bias=False)


class ConvAutoencoder(Autoencoder):
    def __init__(self, pattern: tuple[int, int], latent_dim: int, channels=(16, 32, 64)):
        super().__init__()
        self.pattern = tuple(pattern)
        step = 2 ** len(channels)
        self.padded = tuple(int(math.ceil(n / step) * step) for n in self.pattern)
        self.small = tuple(n // step for n in self.padded)
        enc: list[nn.Module] = []
        c_in = 1
        for c in channels:
            enc += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GELU()]
            c_in = c
        flat = channels[-1] * self.small[0] * self.small[1]
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(flat, latent_dim))
        dec: list[nn.Module] = [nn.Linear(latent_dim, flat), nn.GELU(),
                                nn.Unflatten(1, (channels[-1], *self.small))]
        rev = list(channels[::-1]) + [1]
        for i, (a, b) in enumerate(zip(rev[:-1], rev[1:])):
            dec.append(nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=1))
            if i < len(rev) - 2:
                dec.append(nn.GELU())
        self.decoder = nn.Sequential(*dec)

    def _in(self, x):
        img = x.reshape(x.shape[0], 1, *self.pattern)
        pad_y, pad_x = self.padded[0] - self.pattern[0], self.padded[1] - self.pattern[1]
        return nn.functional.pad(img, (0, pad_x, 0, pad_y))

    def _out(self, y):
        return y[:, 0, : self.pattern[0], : self.pattern[1]].reshape(y.shape[0], -1)


def build_model(kind: str, input_shape: tuple[int, ...], latent_dim: int,
                widths: tuple[int, ...] = (256, 64), variational: bool = False,
                pca_path: bool = False) -> Autoencoder:
    """An autoencoder for inputs of ``input_shape`` (signal dims), checked against the config."""
    model = _build(kind, input_shape, latent_dim, widths)
    if pca_path:
        if kind == "linear":
            raise ConfigError("train.pca_path: the linear autoencoder is the PCA check itself; "
                              "use 'mlp' or 'conv'")
        model.make_pca_path(int(math.prod(input_shape)), latent_dim)
    if variational:
        if kind == "linear":
            raise ConfigError("train.variational: the linear autoencoder (the PCA check) is not "
                              "variational; use 'mlp' or 'conv'")
        model.make_variational()
    return model


def _build(kind, input_shape, latent_dim, widths) -> Autoencoder:
    n_features = int(math.prod(input_shape))
    if kind not in KINDS:
        raise ConfigError(f"train.model: {kind!r} is not one of {KINDS}")
    if not (isinstance(latent_dim, int) and 1 <= latent_dim < n_features):
        raise ConfigError(f"train.latent_dim: must be an integer from 1 to {n_features - 1} "
                          f"(fewer than the {n_features} features), got {latent_dim!r}")
    if kind == "linear":
        return LinearAutoencoder(n_features, latent_dim)
    if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ConfigError(f"train.widths: must be positive integers, got {widths!r}")
    if kind == "conv":
        if len(input_shape) != 2:
            raise ConfigError("train.model: 'conv' is for diffraction patterns (ky, kx); use 'mlp' "
                              "for spectra")
        return ConvAutoencoder(tuple(input_shape), latent_dim, tuple(widths))
    return MLPAutoencoder(n_features, latent_dim, tuple(widths))
