"""``emscale info``: what a scan store holds, for people (text) and scripts (JSON)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emscale.store import COMPUTE_DTYPE, MIB, open_scan, store_size_bytes


def _calibration(values: np.ndarray, attrs: dict) -> dict[str, Any]:
    step = float(values[1] - values[0]) if len(values) > 1 else 0.0
    uniform = len(values) < 3 or bool(np.allclose(np.diff(values), step, rtol=1e-6, atol=1e-12))
    return {"start": float(values[0]), "step": step, "end": float(values[-1]), "uniform": uniform,
            "units": attrs.get("units", ""), "calibrated": attrs.get("calibrated", True)}


def describe_store(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    ds = open_scan(path)
    sig = ds["signal"]
    nav_chunk = (sig.chunks[0][0], sig.chunks[1][0])
    sig_size = int(np.prod(sig.shape[2:]))
    group = zarr.open_group(str(path), mode="r")
    on_disk = store_size_bytes(path)
    raw_bytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in ds.data_vars.values())
    return {
        "path": str(path),
        "kind": ds.attrs["kind"],
        "dims": list(sig.dims),
        "shape": list(sig.shape),
        "dtype": str(sig.dtype),
        "chunks": {
            "navigation_block": list(nav_chunk),
            "n_chunks": len(sig.chunks[0]) * len(sig.chunks[1]),
            "block_mib_float32": nav_chunk[0] * nav_chunk[1] * sig_size
            * np.dtype(COMPUTE_DTYPE).itemsize / MIB,
            "block_mib_stored": nav_chunk[0] * nav_chunk[1] * sig_size * sig.dtype.itemsize / MIB,
            "codecs": [type(c).__name__ + (f"({c.cname.value})" if hasattr(c, "cname") else "")
                       for c in group["signal"].compressors],
        },
        "calibrations": {d: _calibration(np.asarray(ds[d].values), dict(ds[d].attrs))
                         for d in sig.dims if d in ds.coords},
        "variables": {n: {"dims": list(v.dims), "dtype": str(v.dtype)} for n, v in ds.data_vars.items()},
        "size_on_disk_bytes": on_disk,
        "compression_ratio": raw_bytes / on_disk if on_disk else None,
        "ground_truth": all(v in ds.data_vars for v in ("clean", "label")),
        "attrs": {k: v for k, v in ds.attrs.items()},
    }


def format_description(d: dict[str, Any]) -> str:
    c = d["chunks"]
    lines = [
        f"{d['path']}: {d['kind']} scan",
        f"  dims        {' x '.join(f'{n}={s}' for n, s in zip(d['dims'], d['shape']))}",
        f"  dtype       {d['dtype']}",
        f"  chunks      {c['n_chunks']} navigation blocks of {c['navigation_block'][0]} x "
        f"{c['navigation_block'][1]} pixels ({c['block_mib_stored']:.1f} MiB stored, "
        f"{c['block_mib_float32']:.1f} MiB as float32), codecs {', '.join(c['codecs'])}",
        f"  on disk     {d['size_on_disk_bytes'] / 1e6:.1f} MB (compression {d['compression_ratio']:.2f}x)",
        "  calibration",
    ]
    for dim, cal in d["calibrations"].items():
        units = cal["units"] or ("uncalibrated" if not cal["calibrated"] else "no units")
        step = f"step {cal['step']:.6g}" if cal["uniform"] else "non-uniform"
        lines.append(f"    {dim:<8}{cal['start']:.6g} .. {cal['end']:.6g} {units} ({step})")
    lines.append("  variables   " + ", ".join(f"{n} {v['dtype']}{tuple(v['dims'])}"
                                              for n, v in d["variables"].items()))
    src = d["attrs"].get("source", {})
    if src.get("path"):
        lines.append(f"  source      {src['path']} ({src.get('format', '?')}, {src.get('size', 0) / 1e6:.1f} MB, "
                     f"sha256 {src.get('sha256', '?')[:16]}...)")
    if d["attrs"].get("synthetic"):
        gen = d["attrs"].get("generator", {})
        lines.append("  synthetic   " + ", ".join(f"{k}={v}" for k, v in gen.items()))
    if "phase_names" in d["attrs"]:
        lines.append(f"  phases      {', '.join(d['attrs']['phase_names'])}")
    return "\n".join(lines)


def is_results_store(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not (path / "zarr.json").exists() or (path / "signal").exists():
        return False
    return "provenance" in zarr.open_group(str(path), mode="r", zarr_format=3).attrs


def describe_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results store (``emscale run``'s results.zarr), as ``docs/stores.md`` lays it
    out: its stages in run order, each with its variables (dims, shape, dtype, meaning, units,
    from the registry's declarations), cache key and times, and the run's provenance."""
    from emscale.results import ResultsStore
    from emscale.stages import REGISTRY

    store = ResultsStore(path)
    stages = {}
    order = {name: i for i, name in enumerate(REGISTRY.names)}
    for name in sorted(store.stages(), key=lambda n: order.get(n, len(order))):
        group = zarr.open_group(str(store.path / name), mode="r", zarr_format=3)
        declared = REGISTRY[name].outputs if name in order else {}
        arrays = {k: v for k, v in group.arrays()
                  if tuple(v.metadata.dimension_names or ()) != (k,)}  # not coordinates
        names = [n for n in declared if n in arrays] + sorted(set(arrays) - set(declared))
        attrs = dict(group.attrs)
        stages[name] = {
            "about": REGISTRY[name].about if name in order else "",
            "variables": {k: {"dims": list(arrays[k].metadata.dimension_names or ()),
                              "shape": list(arrays[k].shape), "dtype": str(arrays[k].dtype),
                              "meaning": declared[k].meaning if k in declared else "",
                              "units": declared[k].units if k in declared else ""}
                          for k in names},
            "cache_key": attrs.get("config_hash"), "started": attrs.get("started"),
            "finished": attrs.get("finished")}
    attrs = store.attrs
    return {"path": str(path), "kind": "results", "stages": stages,
            "provenance": attrs.get("provenance", {}), "run": attrs.get("run", {})}


def format_results(d: dict[str, Any]) -> str:
    prov = d["provenance"]
    src = (prov.get("input") or {}).get("path") or "generated scan"
    lines = [f"{d['path']}: results of emscale run ({src}; workflow {prov.get('workflow_hash')}, "
             f"started {prov.get('started')}); the layout: docs/stores.md"]
    for name, st in d["stages"].items():
        lines.append(f"  {name}: {st['about']}")
        lines.append(f"    key {st['cache_key'] or '-'}, {st['started'] or ''} .. "
                     f"{st['finished'] or ''}")
        for k, v in st["variables"].items():
            units = f" [{v['units']}]" if v["units"] else ""
            lines.append(f"    {k} ({', '.join(v['dims'])}) {'x'.join(map(str, v['shape']))} "
                         f"{v['dtype']}{units}: {v['meaning']}")
    if d["run"]:
        lines.append(f"  last run: ran {', '.join(d['run'].get('ran', [])) or 'nothing'}; "
                     f"finished {d['run'].get('finished')}")
    return "\n".join(lines)
