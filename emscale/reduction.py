"""Tree reductions over navigation blocks, run on the cluster.

Every statistic a stage needs over the whole scan (the mean spectrum for Poisson weighting, the
origin fit of 4D-STEM patterns, the PCA scatter matrix) is one small function per block and one
function that merges a list of partial results. ``tree_reduce`` builds the graph: one task per block,
then merges ``split_every`` wide, level by level, until one task is left. Only the final, small
result travels to the client; the loop below only builds the graph.
"""

from __future__ import annotations

import time

from typing import Any, Callable

import dask
import dask.array as da
from dask.base import tokenize


WINDOW_BLOCKS = 256
"""Navigation blocks per compute in ``reduce_blocks`` (and per write in the results store): the
scheduler holds a few kilobytes per task in the client's process (+123 MB for 20 000 tasks on a
LocalCluster here), so a pass over a 100 GB scan in one compute would make the client's memory
grow with the scan. A window of 256 blocks of <= 64 MiB is a few thousand tasks."""


def tree_reduce(
    block_fn: Callable[..., Any],
    merge_fn: Callable[[list], Any],
    *arrays: da.Array,
    name: str = "reduce",
    split_every: int = 8,
    group: int = 1,
    group_fn: Callable[..., Any] | None = None,
):
    """A delayed object for ``merge_fn`` over ``block_fn(*blocks)`` of every navigation block.

    The arrays must share their block structure (same ``numblocks``); their blocks are paired in
    order. ``block_fn`` and ``merge_fn`` must be picklable (module-level functions or partials).
    ``group`` > 1: each first-level task is ``group_fn(*blocks)`` of that many consecutive
    blocks (given array by array) and returns one partial result, for partial results that are
    large beside a block (a scatter matrix of thousands of features): fewer to hold and move.
    ``reduce_blocks`` computes the same in windows of blocks.
    """
    blocks = _block_lists(arrays, group, group_fn, split_every)
    token = tokenize(block_fn, merge_fn, *arrays, group, group_fn)
    return _tree(block_fn, merge_fn, blocks, name, token, split_every, group, group_fn)


RUNNING_PASS: dict = {}
"""The pass ``reduce_blocks`` is computing now (its name, blocks in all and before the running
window, the window's leaf tasks' key and blocks per leaf, bytes of its first array, start time):
what the runner's progress lines report (``pass_progress``); empty between passes."""


def reduce_blocks(block_fn: Callable[..., Any], merge_fn: Callable[[list], Any],
                  *arrays: da.Array, window: int | None = None, **options):
    """``tree_reduce(block_fn, merge_fn, *arrays, **options)`` computed: one compute per window
    of ``window`` (default ``WINDOW_BLOCKS``) consecutive blocks, each window's result merged
    here into the running total as it arrives (the loop is over windows, not blocks; two results
    held at a time: a 4096-feature scatter matrix is 134 MB). The client's memory then depends
    on the window, not on the scan."""
    name, split_every, group, group_fn = _tree_options(**options)
    blocks = _block_lists(arrays, group, group_fn, split_every)
    token = tokenize(block_fn, merge_fn, *arrays, group, group_fn)
    window = max(group, (window or WINDOW_BLOCKS) // group * group)
    n = len(blocks[0])
    total = None
    RUNNING_PASS.update(name=name, blocks=n, nbytes=arrays[0].nbytes, t0=time.perf_counter(),
                        shown=0)
    try:
        for w, start in enumerate(range(0, n, window)):
            sub = [b[start:start + window] for b in blocks]
            RUNNING_PASS.update(before=start, window=len(sub[0]), per_leaf=group,
                                leaf=f"{name}-w{w}-block-{token}")
            tree = _tree(block_fn, merge_fn, sub, f"{name}-w{w}", token, split_every, group,
                         group_fn, first=start)
            leaf = f"{name}-w{w}-block-{token}"
            part = dask.compute(fused_into_leaves(
                tree, lambda key: isinstance(key, tuple) and key[0] == leaf))[0]
            total = part if total is None else merge_fn([total, part])
    finally:
        RUNNING_PASS.clear()
    return total


def fused_into_leaves(tree, is_leaf: Callable[[Any], bool]):
    """``tree`` (a Delayed) with each leaf task (``is_leaf(key)``: a block's reduction or
    write) fused with the tasks only it needs: reading the block, its preprocessing, the maps
    sliced to it. One task per block instead of eight to thirteen: at 100 GB the cluster
    stage's features pass ran 13 000 tasks, and the scheduler, in the client's process on the
    same cores, cost about a third of its wall time. Tasks that several leaves share (a block of
    labels, a mask) stay tasks of their own under their own keys, so no key ever gets another
    definition (dask#9888). A graph with annotations (the GPU workers' resources) is left as it
    is: a plain graph would lose them."""
    from dask._task_spec import Task, convert_legacy_graph, cull
    from dask.delayed import Delayed

    graph = tree.__dask_graph__()
    if any(getattr(layer, "annotations", None) for layer in getattr(graph, "layers", {}).values()):
        return tree
    # culled before it is materialized (a window's blocks' arrays span the whole scan: 13 000
    # tasks at 100 GB), and again after: a multi-output task's unused outputs would keep it
    # out of its leaf
    if hasattr(graph, "cull"):
        graph = graph.cull({tree.key})
    dsk = cull(convert_legacy_graph(dict(graph)), [tree.key])
    dependents: dict = {k: set() for k in dsk}
    for key, node in dsk.items():
        for dep in node.dependencies:
            if dep in dependents:
                dependents[dep].add(key)
    out = dict(dsk)
    for leaf in [k for k in dsk if is_leaf(k)]:
        group, todo = {leaf}, list(dsk[leaf].dependencies)
        while todo:  # a task joins once every task that needs it has joined
            dep = todo.pop()
            if dep in group or dep not in dsk or dsk[dep].block_fusion:
                continue
            if dependents[dep] <= group:
                group.add(dep)
                todo.extend(dsk[dep].dependencies)
        if len(group) > 1:
            out[leaf] = Task.fuse(*(dsk[k] for k in group), key=leaf)
            for key in group - {leaf}:
                del out[key]
    return Delayed(tree.key, out)


def pass_progress(remaining_leaves: Callable[[str], int]) -> str | None:
    """``RUNNING_PASS`` as a line: blocks done of all, GB/s of its input, time left;
    ``remaining_leaves(key)``: how many of the running window's leaf tasks are still to run
    (the scheduler forgets finished tasks). None between passes."""
    p = dict(RUNNING_PASS)
    if "leaf" not in p:
        return None
    left_in_window = min(p["window"], remaining_leaves(p["leaf"]) * p["per_leaf"])
    # none left: the window not yet submitted, or all of it done (its leaves forgotten): count
    # it from the next window on. Never backwards
    done = max(p.get("shown", 0), p["before"] + (p["window"] - left_in_window if left_in_window
                                                  else 0))
    RUNNING_PASS["shown"] = done
    seconds = time.perf_counter() - p["t0"]
    rate = done / seconds if seconds > 0 else 0.0
    left = f"about {(p['blocks'] - done) / rate:.0f} s left" if rate > 0 else "time left unknown"
    return (f"{p['name']}: {done} of {p['blocks']} blocks, "
            f"{p['nbytes'] * rate / p['blocks'] / 1e9:.2f} GB/s of its input, {left}")


def _tree_options(name: str = "reduce", split_every: int = 8, group: int = 1,
                  group_fn: Callable[..., Any] | None = None):
    """``tree_reduce``'s options with its defaults (``reduce_blocks`` takes the same)."""
    return name, split_every, group, group_fn


def _block_lists(arrays, group, group_fn, split_every) -> list:
    if not arrays:
        raise ValueError("tree_reduce needs at least one array")
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")
    if group > 1 and group_fn is None:
        raise ValueError("tree_reduce: group > 1 needs a group_fn")
    # unoptimised: dask's fusion names a block after whatever it was fused with, so one key (the
    # valid-pixel mask, a map's features) got another task in each pass, and the scheduler
    # warned of a "different run_spec" (dask#9888) four times per run (12 on a small scan).
    # Unfused, the 1 GB EELS bench ran in the same time per stage with 15-65 % more tasks.
    blocks = [a.to_delayed(optimize_graph=False).ravel() for a in arrays]
    if len({len(b) for b in blocks}) != 1:
        raise ValueError(f"arrays have different block counts: {[a.numblocks for a in arrays]}")
    return blocks


def _tree(block_fn, merge_fn, blocks, name, token, split_every, group, group_fn, first=0):
    """The reduction graph over lists of delayed blocks (one list per array); block keys are
    numbered from ``first`` (a window's blocks keep their place in the scan)."""
    if group > 1:
        parts = [dask.delayed(group_fn, pure=True)(*[b for bs in blocks for b in bs[i:i + group]],
                                              dask_key_name=(f"{name}-block-{token}",
                                                             (first + i) // group))
                 for i in range(0, len(blocks[0]), group)]
    else:
        parts = [dask.delayed(block_fn, pure=True)(*bs, dask_key_name=(f"{name}-block-{token}",
                                                                       first + i))
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


def sum_parts(parts):
    """The sum of partial results: arrays, numbers, or dicts of them (summed key by key)."""
    if isinstance(parts[0], dict):
        return {key: sum_parts([p[key] for p in parts]) for key in parts[0]}
    return sum(parts[1:], parts[0])
