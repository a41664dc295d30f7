"""``emscale bench train``: autoencoder training throughput, in memory and streamed from Zarr.

A synthetic EELS scan (``--shape``, 1024 channels by default) goes through an empty preprocessing
chain into a results store; then, for each batch size, the same MLP (``--widths``, latent 8) is
trained for ``--epochs`` epochs by (a) a plain PyTorch loop over the training pixels held in memory
as one array and (b) emscale's trainer streaming them from the Zarr chunks (shuffle buffer,
spatial split, checkpoint-free). Both use MSE and Adam on ``--threads`` threads; samples/s count the
training steps only (emscale's validation pass is excluded). The first epoch of each is a warm-up
and not counted when there are several.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class TrainBench:
    shape: list
    channels: int
    widths: list
    latent_dim: int
    threads: int
    train_pixels: int
    rows: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        lines = [f"training bench: {self.shape[0]} x {self.shape[1]} x {self.channels} synthetic EELS, "
                 f"{self.train_pixels} training pixels, MLP {self.channels}-"
                 f"{'-'.join(map(str, self.widths))}-{self.latent_dim}, {self.threads} threads",
                 f"{'batch':>7}{'in memory /s':>15}{'streamed /s':>14}{'streamed/in memory':>21}"]
        for r in self.rows:
            lines.append(f"{r['batch_size']:>7}{r['in_memory_samples_per_s']:>15,.0f}"
                         f"{r['streamed_samples_per_s']:>14,.0f}{r['ratio']:>20.0%}")
        return "\n".join(lines)


def _in_memory(x: np.ndarray, widths, latent, batch, epochs, seed=0) -> float:
    import torch

    from emscale.models import build_model

    torch.manual_seed(seed)
    model = build_model("mlp", (x.shape[1],), latent, tuple(widths))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.from_numpy((x - x.mean(0)) / x.std())
    rates = []
    for epoch in range(epochs):
        perm = torch.randperm(len(data))
        t0 = time.perf_counter()
        for s in range(0, len(data), batch):
            xb = data[perm[s:s + batch]]
            out, _ = model(xb)
            loss = torch.mean((out - xb) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(len(data) / (time.perf_counter() - t0))
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


def run_train_bench(shape=(256, 512), channels=1024, widths=(256, 64), latent=8,
                    batches=(256, 1024), epochs=3, threads=2, workdir=None) -> TrainBench:
    import dask
    import torch

    from emscale.results import ResultsStore
    from emscale.stages.preprocess import Preprocessor, write_preprocess_stage
    from emscale.stages.train import TrainConfig
    from emscale.synth.eels import synth_eels
    from emscale.train_stream import ChunkStream
    from emscale.trainer import train_autoencoder

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        results = ResultsStore(Path(tmp) / "results.zarr")
        with dask.config.set(scheduler="threads"):
            write_preprocess_stage(results, synth_eels(tuple(shape), channels=channels, seed=0),
                                   Preprocessor([]))
        stage = results.path / "preprocess"
        base = TrainConfig(widths=tuple(widths), latent_dim=latent, objective="plain",
                           epochs=epochs, threads=threads, patience=epochs + 1)
        stream = ChunkStream(stage, base)
        x = np.concatenate([stream.read(c, 0)[0] for c in stream.chunks])
        bench = TrainBench(shape=list(shape), channels=channels, widths=list(widths),
                           latent_dim=latent, threads=threads, train_pixels=len(x))
        for batch in batches:
            mem = _in_memory(x, widths, latent, batch, epochs)
            cfg = dataclasses.replace(base, batch_size=batch)
            streamed = train_autoencoder(stage, cfg).samples_per_s
            bench.rows.append({"batch_size": batch, "in_memory_samples_per_s": mem,
                               "streamed_samples_per_s": streamed, "ratio": streamed / mem})
    return bench
