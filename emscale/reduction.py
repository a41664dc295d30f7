"""Tree reductions over navigation blocks, run on the cluster.

Every statistic a stage needs over the whole scan (the mean spectrum for Poisson weighting, the
origin fit of 4D-STEM patterns, the PCA scatter matrix) is one small function per block and one
function that merges a list of partial results. ``tree_reduce`` builds the graph: one task per block,
then merges ``split_every`` wide, level by level, until one task is left. Only the final, small
result travels to the client; the loop below only builds the graph.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import dask
import dask.array as da
import numpy as np
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


def _finite_range_block(values, mask=None):
    v = np.asarray(values, np.float64).ravel()
    if mask is not None:
        v = v[np.asarray(mask, bool).ravel()]
    v = v[np.isfinite(v)]
    if not len(v):
        return (0, np.inf, -np.inf)
    return (len(v), float(v.min()), float(v.max()))


def _merge_range(parts):
    return (sum(p[0] for p in parts), min(p[1] for p in parts), max(p[2] for p in parts))


def _histogram_block(values, mask=None, *, edges):
    v = np.asarray(values, np.float64).ravel()
    if mask is not None:
        v = v[np.asarray(mask, bool).ravel()]
    v = v[np.isfinite(v)]
    return np.stack([np.histogram(v, bins=e)[0] for e in edges])


def sum_parts(parts):
    """The sum of partial results: arrays, numbers, or dicts of them (summed key by key)."""
    if isinstance(parts[0], dict):
        return {key: sum_parts([p[key] for p in parts]) for key in parts[0]}
    return sum(parts[1:], parts[0])


def quantiles(values: da.Array, qs, mask: da.Array | None = None, *, bins: int = 4096,
              name: str = "quantile") -> np.ndarray:
    """Quantiles ``qs`` (in [0, 1]) of the finite values of ``values`` (where ``mask``), by
    histogram tree reductions, without collecting the values: the range, then a histogram of
    ``bins`` bins, then a histogram of ``bins`` bins inside each quantile's bin. The result is
    within (range / bins**2) of the exact (inverted-CDF) quantile."""
    qs = np.atleast_1d(np.asarray(qs, np.float64))
    arrays = (values,) if mask is None else (values, mask)
    n, lo, hi = dask.compute(tree_reduce(_finite_range_block, _merge_range, *arrays,
                                         name=f"{name}-range"))[0]
    if n == 0:
        raise ValueError(f"{name}: no finite value to take quantiles of")
    if hi <= lo:
        return np.full(len(qs), lo)
    ranks = np.clip(np.ceil(qs * n).astype(np.int64), 1, n)  # the rank-th smallest value
    edges = [np.linspace(lo, hi, bins + 1)]
    for fine in (False, True):
        counts = dask.compute(tree_reduce(partial(_histogram_block, edges=edges), sum_parts,
                                          *arrays, name=f"{name}-histogram"))[0]
        if not fine:  # coarse pass: which bin holds each rank
            cum = np.cumsum(counts[0])
            idx = np.searchsorted(cum, ranks)
            below = np.where(idx > 0, cum[np.maximum(idx - 1, 0)], 0)
            e = edges[0]
            edges = [np.linspace(e[i], e[i + 1], bins + 1) for i in idx]
        else:  # fine pass inside each bin
            out = []
            for q, (c, e) in enumerate(zip(counts, edges)):
                cum = below[q] + np.cumsum(c)
                i = min(int(np.searchsorted(cum, ranks[q])), bins - 1)
                out.append(0.5 * (e[i] + e[i + 1]))
            return np.asarray(out)
    raise AssertionError("unreachable")
