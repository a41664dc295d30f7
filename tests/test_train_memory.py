"""Streaming keeps training memory independent of the scan size (measured, not assumed). The
streamed path is measured (``resident_mib=0``): a training set held in memory is bounded by
``resident_mib`` itself."""

import dask

from emscale.bench.memory import run_measured
from emscale.results import ResultsStore
from emscale.stages.preprocess import Preprocessor, write_preprocess_stage
from emscale.store import ChunkPolicy
from emscale.synth.eels import synth_eels

SETUP = """
import torch
from emscale.stages.train import TrainConfig
from emscale.trainer import train_autoencoder
torch.set_num_threads(2)
"""


def peak_training_rss(tmp_path, rows: int) -> int:
    path = tmp_path / f"r{rows}.zarr"
    with dask.config.set(scheduler="synchronous"):
        write_preprocess_stage(ResultsStore(path), synth_eels((rows, 64), channels=1024, seed=1,
                                                              policy=ChunkPolicy(target_mib=1.0)),
                               Preprocessor([]))
    work = f"""
r = train_autoencoder({str(path / "preprocess")!r},
                      TrainConfig(epochs=1, latent_dim=8, widths=(64, 16), max_val_pixels=1024,
                                  resident_mib=0))
result = len(r.history["train_loss"])
"""
    out = run_measured(SETUP, work)
    assert out["result"] == 1
    return out["peak_rss"]


def test_training_memory_does_not_grow_with_the_scan(tmp_path):
    small = peak_training_rss(tmp_path, 32)    # 8 MiB of features (+ 8 of clean targets)
    large = peak_training_rss(tmp_path, 512)   # 128 MiB of features (+ 128 of clean targets)
    assert large - small < 40 * 2**20, (small, large)
