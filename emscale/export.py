"""Results out of emscale (``emscale export``): HyperSpy (hspy, zspy), py4DSTEM (EMD 1.0), TIFF,
PNG and NumPy files with calibrated axes.

What goes out is the same for every format: the maps (phase, anomaly, scores, errors), the stacks
of maps (latent codes, PCA scores), the signals per phase or component (phase mean signals, PCA
components) and the scree, and the denoised scan when the run wrote it. Each is read from the
results store lazily; the maps are small (a few bytes a pixel) and are computed whole, the
denoised scan is written chunk by chunk (``dask.array.store``: memory is a few chunks whatever its
size). ``export.json`` beside the files lists each file with its variable, dims, axes (offset,
scale, units) and meaning, and what a format had no place for.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import xarray as xr

from emscale.atomic import atomic_directory, check_apart
from emscale.errors import ConfigError, OutputExistsError, StoreError

log = logging.getLogger(__name__)

FORMATS = ("hspy", "zspy", "py4dstem", "tiff", "png", "npy")
MANIFEST = "export.json"

# the variables exported, per stage (others are bookkeeping: masks, counts, training curves)
EXPORTED = {
    "preprocess": ("polar_orientation",),
    "pca": ("pca_scores", "pca_recon_error", "pca_components", "pca_mean", "pca_scree"),
    "encode": ("latent", "recon_error", "denoised"),
    "anomaly": ("anomaly", "anomaly_score", "mahalanobis"),
    "cluster": ("phase", "pca_phase", "phase_probability", "phase_mean_signal",
                "pca_phase_mean_signal", "phase_centroid_signal", "anomaly_mean_signal"),
}
NAV = ("y", "x")
STACK_DIMS = ("component", "latent_dim", "cluster", "rank")  # index dims: no calibration
# HyperSpy keeps a decomposition's loadings in memory: attached to the denoised scan up to this
LEARNING_LIMIT_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Item:
    """One exported variable: its data in (navigation..., signal...) order, as HyperSpy wants it."""

    name: str
    stage: str
    data: xr.DataArray
    nav: tuple[str, ...]
    sig: tuple[str, ...]
    meaning: str

    @property
    def role(self) -> str:
        if self.sig == NAV:
            return "maps" if self.nav else "map"
        if self.nav == NAV:
            return "scan"
        return "signals" if self.nav else "signal"


def collect(results, stages: tuple[str, ...] | None = None, *, denoised: bool = True) -> list[Item]:
    """The variables to export from ``results`` (a ResultsStore), lazily."""
    from emscale.stages import REGISTRY

    chosen = stages or tuple(s for s in EXPORTED if results.has_stage(s))
    unknown = [s for s in chosen if s not in EXPORTED]
    if unknown:
        raise ConfigError(f"--stage: {', '.join(unknown)} has nothing to export (choose from "
                          f"{', '.join(EXPORTED)})")
    missing = [s for s in chosen if not results.has_stage(s)]
    if missing:
        raise StoreError(f"{results.path}: no stage {', '.join(missing)} (stages: "
                         f"{', '.join(results.stages())})")
    items = []
    for stage in chosen:
        ds = results.open_stage(stage)
        outputs = REGISTRY.get(stage).outputs
        for name in EXPORTED[stage]:
            if name not in ds.data_vars or (name == "denoised" and not denoised):
                continue
            var = ds[name]
            if var.dtype == bool:
                var = var.astype(np.uint8)
            nav, sig = _split(tuple(map(str, var.dims)))
            items.append(Item(name, stage, var.transpose(*nav, *sig), nav, sig,
                              outputs[name].meaning if name in outputs else ""))
    return items


def _split(dims: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """HyperSpy's navigation and signal dims: a map is an image; a stack of maps (codes, scores)
    is images navigated by the stack index, as HyperSpy shows decomposition loadings; a scan is
    navigated by pixel."""
    if dims[:2] == NAV:
        rest = dims[2:]
        if not rest:
            return (), NAV
        if all(d in STACK_DIMS for d in rest):
            return rest, NAV
        return NAV, rest
    nav = tuple(d for d in dims if d in STACK_DIMS and d != "rank")
    return nav, tuple(d for d in dims if d not in nav)


def axis(var: xr.DataArray, dim: str) -> dict:
    """One axis as HyperSpy describes it: offset and scale when uniform, the values otherwise."""
    size = var.sizes[dim]
    if dim not in var.coords or dim in STACK_DIMS:
        return {"name": dim, "size": size, "offset": 0.0, "scale": 1.0, "units": ""}
    coord = var[dim]
    values = np.asarray(coord.values, dtype=np.float64)
    units = str(coord.attrs.get("units", ""))
    if coord.attrs.get("calibrated") is False:
        units = ""
    step = float(values[1] - values[0]) if size > 1 else 1.0
    if size < 3 or np.allclose(np.diff(values), step, rtol=1e-5, atol=0):
        return {"name": dim, "size": size, "offset": float(values[0]), "scale": step,
                "units": units}
    return {"name": dim, "size": size, "axis": values.tolist(), "units": units}


def export_results(path: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *,
                   stages: tuple[str, ...] | None = None, denoised: bool = True,
                   overwrite: bool = False) -> Path:
    """Write the results of ``path`` as ``fmt`` files into ``out`` (default: ``EXPORT-fmt``
    beside the results store), atomically; returns ``out``."""
    from emscale.results import ResultsStore, results_path

    if fmt not in FORMATS:
        raise ConfigError(f"--to: {fmt!r} is not a format (choose from {', '.join(FORMATS)})")
    if fmt == "zspy" and not _zspy_writable():
        raise ConfigError("--to zspy: the installed rosettasciio writes zspy through the Zarr 2 "
                          "API, and Zarr 3 is installed (its writer stops or hangs): use --to hspy "
                          "(HDF5), which HyperSpy reads the same way")
    store = ResultsStore(results_path(path))
    out = Path(out) if out is not None else store.path.parent / f"export-{fmt}"
    items = collect(store, stages, denoised=denoised)
    check_apart(out, [store.path], what="--out")
    if out.exists() and overwrite:
        if not (out / MANIFEST).is_file():
            raise OutputExistsError(f"output {out} exists and is not an emscale export: "
                                    "--overwrite replaces only an export (choose another path)")
        shutil.rmtree(out)
    elif out.exists():
        raise OutputExistsError(f"output {out} exists already (choose another path, remove it, "
                                "or pass --overwrite)")
    kind = store.stage_attrs("preprocess").get("kind") if store.has_stage("preprocess") else None
    if fmt == "py4dstem" and (kind or _kind(items)) != "diffraction":
        raise ConfigError(f"--to py4dstem: {store.path} holds the results of a spectrum image; "
                          "py4DSTEM is for 4D-STEM (use --to hspy)")
    with atomic_directory(out) as tmp:
        tmp.mkdir(parents=True)
        written, skipped = WRITERS[fmt](items, tmp, store)
        manifest = {"format": fmt, "results": str(store.path.resolve()),
                    "scan": store.attrs.get("provenance", {}).get("input", {}),
                    "files": written, "not_exported": skipped}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    log.info("exported %d files of %s to %s", len(written), store.path, out)
    return out


def _zspy_writable() -> bool:
    import zarr

    return hasattr(zarr.storage, "NestedDirectoryStore")  # Zarr 2; rosettasciio 0.15 needs it


def _kind(items: list[Item]) -> str:
    dims = {d for it in items for d in it.data.dims}
    return "diffraction" if {"ky", "kx"} <= dims else "spectrum"


def _entry(item: Item, file: str) -> dict:
    return {"file": file, "stage": item.stage, "variable": item.name,
            "dims": list(item.data.dims), "shape": list(item.data.shape),
            "dtype": str(item.data.dtype), "meaning": item.meaning,
            "axes": [axis(item.data, d) for d in item.data.dims]}


def _values(item: Item) -> np.ndarray:
    return np.asarray(item.data.data.compute() if hasattr(item.data.data, "compute")
                      else item.data.values)


# --- HyperSpy --------------------------------------------------------------------------------

def hyperspy_signal(item: Item, store=None):
    """``item`` as a HyperSpy signal: navigation and signal axes calibrated, lazy for a scan."""
    import hyperspy.api as hs

    axes = [{**axis(item.data, d), "navigate": d in item.nav} for d in item.data.dims]
    for a in axes:
        if not a["units"]:
            a.pop("units")
    cls = hs.signals.Signal1D if len(item.sig) == 1 else hs.signals.Signal2D
    lazy = item.role == "scan"
    data = item.data.data if lazy else _values(item)
    signal = cls(data, axes=axes)
    if lazy:
        signal = signal.as_lazy()
    signal.metadata.General.title = f"emscale {item.stage}.{item.name}"
    if store is not None and (item.role in ("scan", "signal", "signals")
                              and item.name not in ("pca_components", "pca_scree")):
        signal.metadata.set_item("Signal.quantity", _quantity(item, store))
    signal.original_metadata.add_dictionary(
        {"emscale": {"stage": item.stage, "variable": item.name, "meaning": item.meaning,
                     "dims": list(item.data.dims),
                     **{k: _plain(v) for k, v in item.data.attrs.items()}}})
    return signal


def _plain(value):
    """An attribute HyperSpy's writers store: numbers, strings, lists of them."""
    if isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        return list(value)
    return json.dumps(value, default=str)


def _learning_results(signal, items: dict[str, Item], store) -> bool:
    """Put the PCA and the phases where HyperSpy keeps a decomposition and a clustering
    (``signal.learning_results``: factors, loadings, explained variance; cluster labels and
    centres) when they are in the denoised scan's feature space and small enough to hold."""
    den = items["denoised"].data
    pixels = den.sizes["y"] * den.sizes["x"]
    lr = signal.learning_results
    done = False
    comp, scores = items.get("pca_components"), items.get("pca_scores")
    if comp is not None and scores is not None and all(
            comp.data.sizes.get(d) == den.sizes[d] for d in den.dims[2:]):
        k = comp.data.sizes["component"]
        if pixels * k * 4 <= LEARNING_LIMIT_BYTES:
            factors = _values(comp).reshape(k, -1).T
            loadings = _values(scores).reshape(k, pixels).T  # scores are (component, y, x)
            lr.factors, lr.loadings = factors, loadings
            pca = store.open_stage("pca")
            lr.explained_variance = np.asarray(pca["pca_explained_variance"].values)
            lr.explained_variance_ratio = np.asarray(pca["pca_explained_variance_ratio"].values)
            lr.decomposition_algorithm = "emscale PCA (centred on the mean signal)"
            lr.output_dimension = k
            lr.poissonian_noise_normalized = False
            done = True
    phase, means = items.get("phase"), items.get("phase_mean_signal")
    if phase is not None and means is not None and pixels * 16 <= LEARNING_LIMIT_BYTES:
        # what HyperSpy's cluster_analysis leaves, so that get_cluster_labels, _signals and
        # _distances work: labels per phase, sums and centroid signals, distances of each
        # pixel's code to each phase centre (the clustering's own space)
        labels = _values(phase).reshape(-1)
        k = means.data.sizes["cluster"]
        mean = _values(means).reshape(k, -1)
        counts = np.array([(labels == c).sum() for c in range(k)], dtype=np.float64)
        lr.cluster_labels = np.stack([labels == c for c in range(k)])
        lr.cluster_membership = labels
        lr.cluster_sum_signals = mean * counts[:, None]
        decoded = items.get("phase_centroid_signal")
        lr.cluster_centroid_signals = (_values(decoded).reshape(k, -1) if decoded is not None
                                       else mean)
        lr.cluster_centers = mean
        cluster = store.open_stage("cluster")
        codes = store.open_stage("encode")["latent"].values.reshape(pixels, -1)
        centres = np.asarray(cluster["phase_centroid"].values, np.float64)
        if centres.shape[1] == codes.shape[1]:
            lr.cluster_centroids = centres
            lr.cluster_distances = np.stack([np.linalg.norm(codes - c, axis=1) for c in centres])
        lr.cluster_algorithm = "emscale phase clustering of the latent codes"
        lr.number_of_clusters = k
        done = True
    return done


def _write_hyperspy(ext: str) -> Callable:
    def write(items: list[Item], out: Path, store) -> tuple[list, list]:
        written = []
        by_name = {it.name: it for it in items}
        for item in items:
            signal = hyperspy_signal(item, store)
            if item.name == "denoised" and _learning_results(signal, by_name, store):
                log.info("the PCA and phases are in denoised.%s's learning_results", ext)
            file = f"{item.name}.{ext}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                signal.save(out / file, overwrite=True, show_progressbar=False)
            written.append(_entry(item, file))
        return written, []
    return write


# --- py4DSTEM --------------------------------------------------------------------------------

def _py4dstem_units(units: str) -> tuple[float, str]:
    """py4DSTEM's units: reciprocal space in A^-1 (1/nm is 0.1 A^-1), real space as given."""
    if units in ("1/nm", "nm^-1"):
        return 0.1, "A^-1"
    if units in ("1/A", "1/Å", "A^-1"):
        return 1.0, "A^-1"
    return 1.0, units or "pixels"


def _write_py4dstem(items: list[Item], out: Path, store) -> tuple[list, list]:
    """One EMD 1.0 file (``results.h5``) holding a py4DSTEM tree: the denoised scan as a
    DataCube, maps as RealSlices, pattern stacks as DiffractionSlices, one calibration."""

    from emscale.py4dstem_compat import import_py4dstem

    py4DSTEM = import_py4dstem()
    cal = py4DSTEM.Calibration()
    ref = items[0].data
    if "y" in ref.dims:
        ay = axis(ref, "y")
        cal.set_R_pixel_size(ay.get("scale", 1.0))
        cal.set_R_pixel_units(ay["units"] or "pixels")
    pattern = next((it.data for it in items if {"ky", "kx"} <= set(it.data.dims)), None)
    if pattern is None and store.has_stage("preprocess"):  # polar features: the scan's k axes
        from emscale.store import open_scan

        scan = store.stage_attrs("preprocess").get("scan_store")
        if scan and Path(scan).exists():
            pattern = open_scan(scan, validate=False)["signal"]
    if pattern is not None:
        ak = axis(pattern, "ky")
        factor, units = _py4dstem_units(ak["units"])
        cal.set_Q_pixel_size(ak.get("scale", 1.0) * factor)
        cal.set_Q_pixel_units(units)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # py4DSTEM prints and warns as it builds a tree
        root = py4DSTEM.Root(name="emscale")
        written, skipped, stream = [], [], None
        for item in items:
            entry = _entry(item, "results.h5")
            if item.role == "scan":
                if item.sig != ("ky", "kx"):
                    skipped.append({"variable": item.name, "why": f"its signal dims {item.sig} "
                                    "are not a pattern (a polar chain's features)"})
                    continue
                # written through py4DSTEM with a 2 x 2 scan stand-in, then replaced by the whole
                # scan chunk by chunk (py4DSTEM's writer takes one array in memory)
                stub = np.zeros((2, 2, *item.data.shape[2:]), item.data.dtype)
                obj = py4DSTEM.DataCube(stub, name=item.name, calibration=cal)
                stream = item
            elif item.role in ("map", "maps"):
                data = np.moveaxis(_values(item), 0, -1) if item.role == "maps" else _values(item)
                if data.dtype == np.int32:
                    data = data.astype(np.int16) if data.max(initial=0) < 2**15 else data
                labels = _labels(item) if item.role == "maps" else None
                obj = py4DSTEM.RealSlice(data, name=item.name, units=item.meaning[:60],
                                         calibration=cal, slicelabels=labels)
            elif set(item.sig) == {"ky", "kx"}:
                data = _values(item)
                if item.role == "signals":
                    data = np.moveaxis(data, 0, -1)
                obj = py4DSTEM.DiffractionSlice(data, name=item.name, calibration=cal,
                                                slicelabels=_labels(item) if item.nav else None)
            else:
                skipped.append({"variable": item.name, "why": f"dims {item.data.dims}: py4DSTEM "
                                "has no object for it (use --to hspy or npy)"})
                continue
            root.tree(graft=obj)
            entry["py4dstem_path"] = f"emscale/{item.name}"
            written.append(entry)
        file = out / "results.h5"
        py4DSTEM.save(str(file), root, mode="o")
    if stream is not None:
        _stream_datacube(file, stream)
    return written, skipped


def _labels(item: Item) -> list[str]:
    dim = item.nav[0]
    return [f"{dim}_{i}" for i in range(item.data.sizes[dim])]


def _stream_datacube(file: Path, item: Item) -> None:
    import dask.array as da
    import h5py

    with h5py.File(file, "r+") as f:
        group = f[f"emscale/{item.name}"]
        units = group["data"].attrs["units"]
        del group["data"]
        chunks = tuple(c[0] for c in item.data.chunks) if item.data.chunks else True
        dset = group.create_dataset("data", shape=item.data.shape, dtype=item.data.dtype,
                                    chunks=chunks)
        dset.attrs.create("units", units)
        da.store(item.data.data, dset, lock=True)


# --- TIFF, PNG, NumPy ------------------------------------------------------------------------

def _write_tiff(items: list[Item], out: Path, store) -> tuple[list, list]:
    """ImageJ TIFFs (Fiji, HyperSpy and tifffile read the pixel size and its unit): maps, and
    stacks of maps or patterns as multi-page files."""
    import tifffile

    written, skipped = [], []
    for item in items:
        image_dims = NAV if item.sig == NAV else item.sig
        if len(image_dims) != 2 or item.role == "scan":
            skipped.append({"variable": item.name, "why": "not an image (TIFF holds maps and "
                            "pattern stacks; use --to hspy or npy)" if item.role != "scan" else
                            "the scan itself: use --to hspy, py4dstem (4D-STEM) or npy"})
            continue
        data = _values(item)
        if data.dtype == np.int32:
            data = data.astype(np.int16)  # ImageJ has no 32-bit integers; phase ids fit
        elif data.dtype not in (np.uint8, np.uint16, np.int16, np.float32):
            data = data.astype(np.float32)
        ay, ax = axis(item.data, image_dims[0]), axis(item.data, image_dims[1])
        meta = {"axes": "ZYX" if item.nav else "YX", "unit": ax["units"] or "pixel"}
        if item.nav:
            meta["Labels"] = _labels(item)
        file = f"{item.name}.tif"
        tifffile.imwrite(out / file, data, imagej=True,
                         resolution=(1 / ax.get("scale", 1.0), 1 / ay.get("scale", 1.0)),
                         metadata=meta)
        written.append(_entry(item, file))
    return written, skipped


def _write_png(items: list[Item], out: Path, store) -> tuple[list, list]:
    """Pictures: maps pixel for pixel (phases in distinct colours, other maps on viridis between
    their 1st and 99th percentiles), signals as plots with their axis' units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written, skipped = [], []
    for item in items:
        if item.role == "scan":
            skipped.append({"variable": item.name, "why": "the scan itself: use --to hspy, "
                            "py4dstem (4D-STEM) or npy"})
            continue
        data = _values(item).astype(np.float64)
        if item.role in ("map", "maps") or len(item.sig) == 2:
            stack = data if item.nav else data[None]
            for i, image in enumerate(stack):
                file = f"{item.name}.png" if not item.nav else f"{item.name}_{i}.png"
                rgb, style = _colours(item, image)
                plt.imsave(out / file, rgb, **style)
                entry = {**_entry(item, file), "slice": i if item.nav else None}
                if item.name in PHASE_MAPS:  # the key to the colours (as in the plots)
                    entry["colours"] = {str(c): matplotlib.colors.to_hex(phase_colour(c))
                                        for c in np.unique(image[image >= 0]).astype(int)}
                written.append(entry)
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        a = axis(item.data, item.sig[0])
        x = np.asarray(item.data[item.sig[0]].values, float) if item.sig[0] in item.data.coords \
            else np.arange(a["size"])
        for i, curve in enumerate(data if item.nav else data[None]):
            name = item.nav and ("phase" if item.nav[0] == "cluster" else item.nav[0])
            colour = phase_colour(i) if name == "phase" else None
            ax.plot(x, curve, lw=1, label=f"{name} {i}" if name else None, color=colour)
        ax.set_xlabel(f"{item.sig[0]} ({a['units']})" if a["units"] else item.sig[0])
        ax.set_ylabel(_quantity(item, store))
        ax.set_title(f"{item.stage}.{item.name}")
        if item.nav:
            ax.legend(fontsize=8)
        file = f"{item.name}.png"
        fig.savefig(out / file, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(_entry(item, file))
    return written, skipped


PHASE_MAPS = ("phase", "pca_phase")


def phase_colour(c: int) -> tuple:
    """Phase ``c``'s colour in every picture (map and spectra): matplotlib's default cycle
    (tab10), then tab20's light shades."""
    from matplotlib import colormaps

    return colormaps["tab10"](c)[:3] if c < 10 else colormaps["tab20"]((2 * c + 1) % 20)[:3]


def _quantity(item: Item, store) -> str:
    """What a signal's values are: the preprocessed features (not counts), named by the chain
    that made them."""
    if item.name in ("pca_scree",):
        return "explained variance ratio"
    chain = (store.stage_attrs("preprocess").get("preprocess", {})
             if store.has_stage("preprocess") else {})
    steps = ", ".join(s.get("step", "?") for s in chain.get("steps", [])) or "no step"
    return f"preprocessed signal, not counts (after: {steps})"


def _colours(item: Item, image: np.ndarray) -> tuple:
    if item.name in PHASE_MAPS:
        rgb = np.zeros((*image.shape, 3))
        for c in np.unique(image[image >= 0]).astype(int):
            rgb[image == c] = phase_colour(c)
        return rgb, {}
    finite = image[np.isfinite(image)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0, 1))
    return image, {"cmap": "viridis", "vmin": lo, "vmax": hi if hi > lo else lo + 1}


def _write_npy(items: list[Item], out: Path, store) -> tuple[list, list]:
    """``NAME.npy`` per variable (the scan streamed into it chunk by chunk); the axes are in
    export.json."""
    import dask.array as da

    written = []
    for item in items:
        file = f"{item.name}.npy"
        if item.role == "scan":
            with open(out / file, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(item.data.dtype),
                        "fortran_order": False, "shape": item.data.shape})
                da.store(item.data.data, _NpyRows(f.fileno(), f.tell(), item.data.shape,
                                                  item.data.dtype), lock=False)
        else:
            np.save(out / file, _values(item))
        written.append(_entry(item, file))
    return written, []


class _NpyRows:
    """The body of a C-ordered ``.npy`` file as a ``da.store`` target: each block goes to its
    place with ``os.pwrite``, one run of pixels per scan row (a memory map would count the
    whole file in the process's resident memory)."""

    def __init__(self, fd: int, start: int, shape: tuple, dtype):
        self.fd, self.start, self.shape = fd, start, shape
        self.pixel = int(np.prod(shape[2:])) * np.dtype(dtype).itemsize

    def __setitem__(self, key: tuple, block: np.ndarray) -> None:
        ys, xs = key[0], key[1]
        block = np.ascontiguousarray(block)
        for i, y in enumerate(range(*ys.indices(self.shape[0]))):
            x0 = xs.indices(self.shape[1])[0]
            os.pwrite(self.fd, block[i].tobytes(),
                      self.start + (y * self.shape[1] + x0) * self.pixel)


WRITERS = {"hspy": _write_hyperspy("hspy"), "zspy": _write_hyperspy("zspy"),
           "py4dstem": _write_py4dstem, "tiff": _write_tiff, "png": _write_png, "npy": _write_npy}
