"""Issue 7: chunk-level resume. A stage write that fails or is killed keeps the chunks it stored
(under its resume key) and the next write with that key computes only the others."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import yaml

from emscale.results import DONE_DIR, RESUME_MARK, ResultsStore


def _double(block, flag, computed, block_info=None):
    """Twice the block; records that it ran, and fails where the flag file names this chunk."""
    idx = ".".join(map(str, block_info[0]["chunk-location"]))
    Path(computed, f"{idx}-{uuid.uuid4().hex}").touch()
    if Path(flag).exists() and Path(flag).read_text() == idx:
        raise RuntimeError(f"injected failure in chunk {idx}")
    return block * 2


def _dataset(tmp_path, fail_at=None):
    flag, computed = tmp_path / "flag", tmp_path / "computed"
    computed.mkdir(exist_ok=True)
    for p in computed.iterdir():
        p.unlink()
    if fail_at:
        flag.write_text(fail_at)
    else:
        flag.unlink(missing_ok=True)
    x = da.arange(32 * 32 * 4, dtype=np.float32, chunks=(8 * 32 * 4,)).reshape(32, 32, 4)
    x = x.rechunk((8, 8, 4))
    a = x.map_blocks(_double, str(flag), str(computed), dtype=np.float32)
    ds = xr.Dataset({"a": (("y", "x", "c"), a), "total": (("y", "x"), a.sum(axis=2))},
                    coords={"c": np.arange(4)})
    expected = 2 * np.arange(32 * 32 * 4, dtype=np.float32).reshape(32, 32, 4)
    return ds, computed, expected


def _markers(results, name, var="a"):
    return [p for p in results.path.glob(f"{name}{RESUME_MARK}*/{DONE_DIR}/{var}/*")]


def _unfinished(results, name):
    """Blocks that a resumed write computes again: those missing a marker of either variable."""
    both = {p.name.removesuffix(".0") for p in _markers(results, name)} & {
        p.name for p in _markers(results, name, "total")}
    return 16 - len(both)


def _check(stage, expected):
    np.testing.assert_array_equal(stage["a"].values, expected)
    np.testing.assert_allclose(stage["total"].values, expected.sum(axis=2))


def test_a_failed_write_resumes_only_the_unfinished_chunks(tmp_path, sync_scheduler):
    results = ResultsStore(tmp_path / "results.zarr").create()
    ds, computed, expected = _dataset(tmp_path, fail_at="2.1.0")
    with pytest.raises(RuntimeError, match="chunk 2.1.0"):
        results.write_stage("s", ds, resume_key="k1")
    assert not results.has_stage("s")
    assert 1 <= len(_markers(results, "s")) < 16
    unfinished = _unfinished(results, "s")
    ResultsStore(results.path).create()  # a new run does not remove a resumable write

    ds, computed, expected = _dataset(tmp_path)
    stage = results.write_stage("s", ds, resume_key="k1")
    ran = {p.name.split("-")[0] for p in computed.iterdir()}
    assert len(ran) == unfinished
    _check(stage, expected)
    assert not list(results.path.glob(f"s{RESUME_MARK}*"))
    assert not (results.path / "s" / DONE_DIR).exists()


def test_another_key_starts_afresh_and_no_key_leaves_nothing(tmp_path, sync_scheduler):
    results = ResultsStore(tmp_path / "results.zarr").create()
    ds, computed, _ = _dataset(tmp_path, fail_at="2.1.0")
    with pytest.raises(RuntimeError):
        results.write_stage("s", ds, resume_key="old")
    assert _markers(results, "s")
    ds, computed, expected = _dataset(tmp_path, fail_at="2.1.0")
    with pytest.raises(RuntimeError):
        results.write_stage("s", ds, resume_key="new")
    assert {p.name for p in results.path.glob("s.partial-*")} == {f"s{RESUME_MARK}new"}
    ds, computed, expected = _dataset(tmp_path, fail_at="2.1.0")
    with pytest.raises(RuntimeError):
        results.write_stage("s", ds)  # no key: a plain atomic write, removed on error
    assert {p.name for p in results.path.glob("s.partial-*")} == {f"s{RESUME_MARK}new"}


def _executing(dask_worker):
    return len(dask_worker.state.executing)


def _wait_idle(client, timeout=30):
    """Until no task is processing: the scheduler forgets the tasks of a failed compute at
    once, but a worker finishes the one it is running (and writes its marker) after that."""
    import time

    deadline = time.monotonic() + timeout
    while (any(client.processing().values()) or any(client.run(_executing).values())) \
            and time.monotonic() < deadline:
        time.sleep(0.05)


def test_resume_on_a_local_cluster(tmp_path, local_client):
    """Workers store the chunks and leave the markers; the resumed write is complete."""
    results = ResultsStore(tmp_path / "results.zarr").create()
    ds, computed, expected = _dataset(tmp_path, fail_at="2.1.0")
    with pytest.raises(RuntimeError, match="chunk 2.1.0"):
        results.write_stage("s", ds, resume_key="k")
    _wait_idle(local_client)  # tasks already running when the error came back still finish
    unfinished = _unfinished(results, "s")
    ds, computed, expected = _dataset(tmp_path)
    _check(results.write_stage("s", ds, resume_key="k"), expected)
    assert len({p.name.split("-")[0] for p in computed.iterdir()}) == unfinished < 16


def test_a_workflow_killed_in_encode_redoes_only_unfinished_chunks(tmp_path):
    """``emscale run`` killed (SIGKILL) while writing the encode stage; the rerun skips the
    finished stages and writes only the encode chunks that had no marker."""
    import signal
    import subprocess
    import sys
    import time

    wf = {"synth": {"kind": "eels", "shape": [64, 64], "channels": 256, "anomaly": True,
                    "seed": 1},
          "train": {"latent_dim": 3, "widths": [32, 16], "epochs": 1, "tile": 8, "threads": 1},
          "pca": {"n_components": 4}, "encode": {"denoised": True},
          "cluster": {"k_range": [2, 3], "n_init": 1, "sample_size": 1000},
          "chunk_mib": 0.25, "output": str(tmp_path / "out")}
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(wf))
    # one thread, one task at a time, and each encode block slowed down: the kill lands mid-stage
    env = {**os.environ, "DASK_SCHEDULER": "synchronous", "EMSCALE_TEST_SLOW_ENCODE": "0.3"}
    script = ("import os, time, emscale.stages.encode as e\n"
              "slow, block = float(os.environ['EMSCALE_TEST_SLOW_ENCODE']), e.encode_block\n"
              "def encode_block(*a, **k):\n"
              "    time.sleep(slow)\n"
              "    return block(*a, **k)\n"
              "e.encode_block = encode_block\n"
              "from emscale.runner import run_workflow\n"
              "from emscale.workflow import load_workflow\n"
              f"run_workflow(load_workflow({str(path)!r}), echo=print)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = tmp_path / "out" / "results.zarr"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(results.glob(f"encode{RESUME_MARK}*/{DONE_DIR}/latent/*"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed mid-encode"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= len(list(results.glob(f"encode{RESUME_MARK}*/{DONE_DIR}/latent/*"))) < 16
    done = len(list(results.glob(f"encode{RESUME_MARK}*/{DONE_DIR}/*/*")))  # all variables

    from emscale.runner import run_workflow
    from emscale.workflow import load_workflow

    said = []
    with dask.config.set(scheduler="synchronous"):
        rerun = run_workflow(load_workflow(path), echo=said.append)
    assert f"[encode] resumed an interrupted write: {done} of " in "\n".join(said)
    assert rerun.ran[:2] == ["encode", "anomaly"] and {"preprocess", "pca", "train"} <= set(
        rerun.skipped)
    log = (tmp_path / "out" / "emscale.log").read_text()
    resumed = re.search(r"stage encode: resuming, (\d+) of (\d+) chunks already written", log)
    assert resumed and int(resumed[1]) == done and int(resumed[2]) % 16 == 0
    # the resumed stage equals the encoding computed now in one go
    from emscale.model_spec import ModelSpec
    from emscale.stages.encode import PCAProjection, encode_stage

    store = ResultsStore(results)
    encoded, features = store.open_stage("encode"), store.open_stage("preprocess")
    spec = ModelSpec.from_train_stage(store.open_stage("train"), (256,))
    fresh = encode_stage(features, spec, pca=PCAProjection.from_pca_stage(store.open_stage("pca"), 3),
                         denoised=True)
    for name in ("latent", "recon_error", "pca_recon_error", "denoised"):
        # (equal up to BLAS summation order: the killed run had other threads)
        np.testing.assert_allclose(encoded[name].values, fresh[name].values, rtol=1e-4, atol=1e-5)


def _slow_block(block):
    import time

    time.sleep(0.05)
    return block + 1


def test_a_stage_write_reports_progress_lines_for_a_batch_log(tmp_path):
    """Without a terminal (no progress bar), a stage write says how many chunks are on disk, at
    what rate and how long is left, every ``every`` seconds (30 by default)."""
    import dask.array as da
    import xarray as xr

    data = da.zeros((64, 8), chunks=(4, 8), dtype=np.float32).map_blocks(_slow_block)
    said = []
    with dask.config.set(scheduler="synchronous"):
        written = ResultsStore(tmp_path / "r.zarr").write_stage(
            "s", xr.Dataset({"v": (("a", "b"), data)}), lines=said.append, every=0.1,
            scan_nbytes=64 << 30)
    assert (written["v"].values == 1).all()
    assert said, "no progress line in 0.8 s of writing"
    counts = [int(re.match(r"(\d+) of 16 chunks written \(\d+ %\), [\d.]+ GB/s of the scan, "
                           r"[\d.]+ MB/s of output, ", s)[1]) for s in said]
    assert counts == sorted(counts) and counts[-1] <= 16


def test_a_rewritten_target_is_opened_again(tmp_path):
    """Block writes reuse an opened array only while its zarr.json is the same file."""
    import zarr

    from emscale.results import _store_chunk

    marks = tmp_path / "marks"
    marks.mkdir()
    target = str(tmp_path / "a")
    zarr.create_array(target, shape=(4,), chunks=(2,), dtype="f4", zarr_format=3)
    _store_chunk(np.full(2, 1.5, np.float32), target, str(marks), (slice(0, 2),))
    assert zarr.open_array(target)[:2].tolist() == [1.5, 1.5]
    zarr.create_array(target, shape=(4,), chunks=(2,), dtype="i2", zarr_format=3, overwrite=True)
    _store_chunk(np.full(2, 7.0, np.float32), target, str(marks), (slice(2, 4),))
    again = zarr.open_array(target)
    assert again.dtype == np.int16 and again[2:].tolist() == [7, 7]
