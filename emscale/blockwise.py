"""Per-navigation-block functions with several outputs and shared constants, as one dask graph.

``map_nav_blocks(fn, arrays, outputs, constants=...)`` runs ``fn(*blocks, *constants)`` once per
navigation block of ``arrays`` (all ``(y, x, ...)`` with the same navigation chunks and unsplit
trailing dims) and gives one dask array per output, each block a ``getitem`` of the block's
result. Each constant (a model's weights, PCA components) is a single key of the graph: the
scheduler computes it once and a worker fetches it once, whatever the number of tasks that use it
(DESIGN.md section 4: weights are sent once per worker, not once per task).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph


def map_nav_blocks(
    fn: Callable[..., tuple],
    arrays: Sequence[da.Array],
    outputs: Sequence[tuple[tuple[int, ...], Any]],
    *,
    name: str,
    constants: Sequence[Any] = (),
    origin_step: int | None = None,
) -> list[da.Array]:
    """One dask array per ``outputs`` entry ``(trailing shape, dtype)``: the ``(y, x, *trailing)``
    arrays that ``fn(*blocks, *constants)`` returns, in order, for each navigation block.

    Constants must not be tuples or lists (the graph would read them as tasks); wrap them in an
    object or a numpy array. With ``origin_step``, ``fn`` gets a first argument more: the scan
    position of the block's first pixel and the step between its pixels, ``[y0, x0, step]``
    (the arrays being every ``step``-th pixel of the scan), so that no array of positions is
    needed (three tasks per block fewer).
    """
    arrays = list(arrays)
    nav = arrays[0].chunks[:2]
    for a in arrays:
        if a.chunks[:2] != nav:
            raise ValueError(f"{name}: arrays have different navigation chunks")
        if any(len(c) > 1 for c in a.chunks[2:]):
            raise ValueError(f"{name}: trailing dims must be one chunk")
    token = tokenize(fn, *arrays, *constants, [tuple(o[0]) for o in outputs], origin_step)
    main = f"{name}-{token}"
    const_keys = [f"{name}-constant{i}-{token}" for i in range(len(constants))]
    out_names = [f"{name}-out{o}-{token}" for o in range(len(outputs))]
    base = HighLevelGraph.merge(*[a.__dask_graph__() for a in arrays])
    layers, deps = dict(base.layers), dict(base.dependencies)
    for key, value in zip(const_keys, constants):
        layers[key], deps[key] = {key: value}, set()
    main_dsk: dict = {}
    out_dsk: list[dict] = [{} for _ in outputs]
    starts = [np.concatenate([[0], np.cumsum(c)]) for c in nav]
    for i, j in np.ndindex(len(nav[0]), len(nav[1])):
        blocks = [(a.name, i, j, *(0,) * (a.ndim - 2)) for a in arrays]
        if origin_step is not None:  # a numpy array: a literal in the task, not a task
            blocks.insert(0, np.array([starts[0][i] * origin_step, starts[1][j] * origin_step,
                                       origin_step], np.int64))
        main_dsk[(main, i, j)] = (fn, *blocks, *const_keys)
        for o, (tail, _) in enumerate(outputs):
            out_dsk[o][(out_names[o], i, j, *(0,) * len(tail))] = (operator.getitem, (main, i, j), o)
    layers[main] = main_dsk
    deps[main] = {layer for a in arrays for layer in a.__dask_layers__()} | set(const_keys)
    for out_name, d in zip(out_names, out_dsk):
        layers[out_name], deps[out_name] = d, {main}
    graph = HighLevelGraph(layers, deps)
    return [da.Array(graph, out_name, nav + tuple((n,) for n in tail), dtype=dtype)
            for out_name, (tail, dtype) in zip(out_names, outputs)]
