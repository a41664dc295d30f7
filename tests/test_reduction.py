"""Reductions and writes in windows of blocks: the same results as one compute, and the
scheduler (in the client's process) never holds more than a window's tasks."""

from __future__ import annotations

from functools import partial

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from emscale.reduction import reduce_blocks, sum_parts, tree_reduce
from emscale.results import ResultsStore
from emscale.stages.pca import _scatter_block, _scatter_group, merge_scatter


def _sum_block(x):
    return np.asarray(x, np.float64).sum(axis=0)


@pytest.mark.parametrize("window", [1, 3, 7, 100])
def test_windowed_reduction_equals_one_compute(window, sync_scheduler):
    x = da.random.default_rng(0).random((130, 5), chunks=(10, 5)).astype(np.float32)
    whole = tree_reduce(_sum_block, sum_parts, x).compute()
    np.testing.assert_allclose(reduce_blocks(_sum_block, sum_parts, x, window=window), whole)
    # grouped first level (the PCA of many features): windows hold whole groups
    group_fn = partial(_scatter_group, n_arrays=1)
    exact = tree_reduce(_scatter_block, merge_scatter, x, group=4, group_fn=group_fn).compute()
    windowed = reduce_blocks(_scatter_block, merge_scatter, x, group=4, group_fn=group_fn,
                             window=window)
    assert windowed["n"] == exact["n"] == 130
    np.testing.assert_allclose(windowed["mean"], exact["mean"], rtol=1e-6)
    np.testing.assert_allclose(windowed["m2"], exact["m2"], rtol=1e-5)


def _graph_sizes():
    from distributed.diagnostics.plugin import SchedulerPlugin

    class GraphSizes(SchedulerPlugin):
        name = "graph-sizes"

        def __init__(self):
            self.sizes = []

        def update_graph(self, scheduler, *, tasks, **kwargs):
            self.sizes.append(len(tasks))

    return GraphSizes()


def _install(dask_scheduler=None):
    if "graph-sizes" not in dask_scheduler.plugins:
        dask_scheduler.add_plugin(_graph_sizes(), name="graph-sizes")
    dask_scheduler.plugins["graph-sizes"].sizes = []


def _sizes(dask_scheduler=None):
    plugin = dask_scheduler.plugins["graph-sizes"]
    sizes, plugin.sizes = list(plugin.sizes), []
    return sizes


def test_a_pass_and_a_write_submit_a_window_of_tasks_at_a_time(local_client, tmp_path,
                                                                monkeypatch):
    local_client.run_on_scheduler(_install)
    x = da.random.default_rng(1).random((64, 8, 3), chunks=(2, 8, 3)).astype(np.float32)
    flat = x.reshape(-1, 3).rechunk((16, 3))  # 32 blocks
    whole = tree_reduce(_sum_block, sum_parts, flat).compute()
    one = max(local_client.run_on_scheduler(_sizes))
    np.testing.assert_allclose(reduce_blocks(_sum_block, sum_parts, flat, window=4), whole,
                               rtol=1e-6)
    sizes = local_client.run_on_scheduler(_sizes)
    assert len(sizes) == 8 and max(sizes) < one / 4, (sizes, one)

    monkeypatch.setattr("emscale.results.WINDOW_BLOCKS", 4)
    ds = xr.Dataset({"a": (("y", "x", "c"), x * 2), "t": (("y", "x"), x.sum(axis=2))})
    stage = ResultsStore(tmp_path / "results.zarr").create().write_stage("s", ds)
    sizes = local_client.run_on_scheduler(_sizes)
    assert len(sizes) == 8 and max(sizes) <= 4 * 8, sizes  # 32 blocks: 8 windows of 4
    np.testing.assert_array_equal(stage["a"].values, 2 * x.compute())
    np.testing.assert_allclose(stage["t"].values, x.sum(axis=2).compute(), rtol=1e-6)


def _class_sum_block(x, labels):
    return np.stack([np.asarray(x, np.float64)[np.asarray(labels) == c].sum(axis=0)
                     for c in range(3)])


def test_each_block_is_one_task_with_what_only_it_needs(local_client):
    """A pass's block task runs the reads and maps that only it needs (one task a block, not one
    per layer); a task several blocks share (a block of labels) stays one task."""
    import dask

    from emscale.reduction import fused_into_leaves

    local_client.run_on_scheduler(_install)
    x = da.random.default_rng(2).random((64, 6), chunks=(8, 6)).astype(np.float32)  # 8 blocks
    chain = (x * 2 + 1).map_blocks(np.sqrt)  # four tasks a block
    labels = (da.arange(64, chunks=32) % 3).rechunk(8)  # each of 2 blocks serves 4
    total = reduce_blocks(_class_sum_block, sum_parts, chain, labels)
    (size,) = local_client.run_on_scheduler(_sizes)
    # 8 block tasks + the 2 shared label blocks' arange and % (4 tasks) + 1 merge; unfused:
    # 8 x 6 (random, *, +, sqrt, the labels' slice, the sum) + 4 + 1
    assert size == 13, size
    lab, values = np.arange(64) % 3, np.sqrt(x.compute().astype(np.float64) * 2 + 1)
    np.testing.assert_allclose(total, [values[lab == c].sum(axis=0) for c in range(3)],
                               rtol=1e-6)
    # annotations (the GPU workers' resources) live on the layers: such a graph is left whole
    with dask.annotate(retries=1):
        annotated = tree_reduce(_sum_block, sum_parts, x * 2)
    assert fused_into_leaves(annotated, lambda key: True) is annotated


def _slow_sum_block(x):
    import time

    time.sleep(0.05)
    return _sum_block(x)


def test_a_pass_says_blocks_done_rate_and_time_left_while_it_runs(local_client):
    """What a batch job's log shows between a stage's start and its write: the pass running,
    its blocks done of all (counted on the scheduler), GB/s and time left."""
    import re
    import threading
    import time

    from emscale.reduction import RUNNING_PASS, pass_progress
    from emscale.runner import _tasks_line

    x = da.ones((80, 1000), chunks=(2, 1000), dtype=np.float32)  # 40 blocks
    lines, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            lines.append(_tasks_line())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        total = reduce_blocks(_slow_sum_block, sum_parts, x, window=10, name="slow-pass")
    finally:
        stop.set()
        watcher.join()
    np.testing.assert_allclose(total, np.full(1000, 80.0))
    said = [re.search(r"slow-pass: (\d+) of 40 blocks, [\d.]+ GB/s of its input, "
                      r"(about \d+ s left|time left unknown); \d+ tasks to do", line)
            for line in lines]
    done = [int(m.group(1)) for m in said if m]
    assert any(0 < d < 40 for d in done), lines
    assert done == sorted(done)  # counted, not guessed: never backwards
    assert not RUNNING_PASS and pass_progress(lambda key: 0) is None
