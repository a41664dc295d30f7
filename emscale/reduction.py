"""Tree reductions over navigation blocks, run on the cluster.

Every statistic a stage needs over the whole scan (the mean spectrum for Poisson weighting, the
origin fit of 4D-STEM patterns, the PCA scatter matrix) is one small function per block and one
function that merges a list of partial results. ``tree_reduce`` builds the graph: one task per block,
then merges ``split_every`` wide, level by level, until one task is left. Only the final, small
result travels to the client; the loop below only builds the graph.
"""

from __future__ import annotations

from typing import Any, Callable

import dask
import dask.array as da
from dask.base import tokenize


def tree_reduce(
    block_fn: Callable[..., Any],
    merge_fn: Callable[[list], Any],
    *arrays: da.Array,
    name: str = "reduce",
    split_every: int = 8,
):
    """A delayed object for ``merge_fn`` over ``block_fn(*blocks)`` of every navigation block.

    The arrays must share their block structure (same ``numblocks``); their blocks are paired in
    order. ``block_fn`` and ``merge_fn`` must be picklable (module-level functions or partials).
    """
    if not arrays:
        raise ValueError("tree_reduce needs at least one array")
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")
    blocks = [a.to_delayed().ravel() for a in arrays]
    if len({len(b) for b in blocks}) != 1:
        raise ValueError(f"arrays have different block counts: {[a.numblocks for a in arrays]}")
    token = tokenize(block_fn, merge_fn, *arrays)
    parts = [dask.delayed(block_fn, pure=True)(*bs, dask_key_name=(f"{name}-block-{token}", i))
             for i, bs in enumerate(zip(*blocks))]
    level = 0
    while len(parts) > 1:
        level += 1
        parts = [dask.delayed(merge_fn, pure=True)(parts[i:i + split_every],
                                                   dask_key_name=(f"{name}-merge-{token}", level, i))
                 for i in range(0, len(parts), split_every)]
    if len(parts) == 1 and level == 0:  # a single block still goes through merge_fn
        parts = [dask.delayed(merge_fn, pure=True)(parts, dask_key_name=(f"{name}-merge-{token}", 1, 0))]
    return parts[0]
