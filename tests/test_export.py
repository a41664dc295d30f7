"""Results out of emscale (issue 19): every export loaded back with the tool a facility user
would use (HyperSpy, py4DSTEM, tifffile, NumPy) and checked, values and axes, against the results
store; every results group opened by plain xarray without a warning."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import tifffile
import xarray as xr
from dask.callbacks import Callback

from emscale import open_results
from emscale.cli import main
from emscale.export import export_results
from emscale.results import ResultsStore
from emscale.runner import run_workflow
from emscale.workflow import validate_workflow

SMALL = {
    "train": {"latent_dim": 3, "widths": [32, 16], "epochs": 1, "tile": 4, "threads": 1,
              "batch_size": 64},
    "pca": {"n_components": 4},
    "encode": {"denoised": True},
    "cluster": {"k_range": [2, 3], "n_init": 1},
}


def _run(tmp, synth, **sections):
    wf = validate_workflow({**SMALL, **sections, "synth": synth, "output": str(tmp / "out"),
                            "chunk_mib": 0.05})
    result = run_workflow(wf, echo=lambda *a: None, report=False)
    return ResultsStore(result.results)


@pytest.fixture(scope="module")
def eels(small_eels_run):  # the report's tests read the same run
    return ResultsStore(small_eels_run.results)


@pytest.fixture(scope="module")
def d4(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("d4"),
                {"kind": "4dstem", "shape": [8, 8], "pattern": [64, 64], "seed": 3},
                # the exact solver's eigendecomposition of 4096 x 4096 takes half a minute
                pca={"n_components": 4, "solver": "randomized"})


def _same_axis(hs_axis, coord):
    values = np.asarray(coord.values, float)
    assert hs_axis.offset == pytest.approx(values[0])
    assert hs_axis.scale == pytest.approx(values[1] - values[0])
    assert hs_axis.units == coord.attrs["units"]


def test_hyperspy_loads_every_export_with_its_values_and_calibrated_axes(eels, tmp_path):
    import hyperspy.api as hs

    out = export_results(eels.path, "hspy", tmp_path / "hspy")
    manifest = json.loads((out / "export.json").read_text())
    names = {f["variable"] for f in manifest["files"]}
    assert {"phase", "anomaly", "anomaly_score", "latent", "pca_scores", "pca_components",
            "pca_scree", "phase_mean_signal", "denoised"} <= names
    cl, enc, pca = (eels.open_stage(s) for s in ("cluster", "encode", "pca"))

    phase = hs.load(out / "phase.hspy")
    assert phase.axes_manager.signal_dimension == 2 and phase.axes_manager.navigation_size == 0
    np.testing.assert_array_equal(phase.data, cl["phase"].values)
    y, x = phase.axes_manager.signal_axes[1], phase.axes_manager.signal_axes[0]
    _same_axis(y, cl["y"]), _same_axis(x, cl["x"])

    latent = hs.load(out / "latent.hspy")  # codes as images navigated by coordinate (loadings)
    assert latent.axes_manager.navigation_shape == (3,)
    np.testing.assert_array_equal(latent.data, np.moveaxis(enc["latent"].values, -1, 0))

    means = hs.load(out / "phase_mean_signal.hspy")  # one spectrum per phase
    assert means.axes_manager.navigation_shape == (cl.sizes["cluster"],)
    _same_axis(means.axes_manager.signal_axes[0], cl["energy"])
    np.testing.assert_array_equal(means.data, cl["phase_mean_signal"].values)

    den = hs.load(out / "denoised.hspy", lazy=True)  # navigated by pixel, energy the signal
    assert den.axes_manager.navigation_shape == (10, 12)
    _same_axis(den.axes_manager.navigation_axes[1], enc["y"])
    _same_axis(den.axes_manager.signal_axes[0], enc["energy"])
    np.testing.assert_array_equal(den.data.compute(), enc["denoised"].values)
    # the PCA and the phases where HyperSpy keeps a decomposition and a clustering
    lr = den.learning_results
    np.testing.assert_array_equal(lr.factors, pca["pca_components"].values.T)
    np.testing.assert_array_equal(lr.loadings, pca["pca_scores"].values.reshape(120, 4))
    np.testing.assert_allclose(lr.explained_variance, pca["pca_explained_variance"].values)
    np.testing.assert_array_equal(lr.cluster_membership, cl["phase"].values.reshape(-1))
    den = hs.load(out / "denoised.hspy")  # HyperSpy's own cluster and decomposition methods
    k = cl.sizes["cluster"]
    np.testing.assert_allclose(den.get_cluster_signals().data, cl["phase_mean_signal"].values,
                               rtol=1e-5)
    assert den.get_cluster_distances().data.shape == (k, 12, 10)
    assert den.get_decomposition_model().data.shape == (12, 10, cl.sizes["energy"])


def test_py4dstem_loads_its_objects_with_the_calibration(d4, tmp_path):
    from emscale.py4dstem_compat import import_py4dstem

    py4DSTEM = import_py4dstem()
    out = export_results(d4.path, "py4dstem", tmp_path / "p4")
    file = str(out / "results.h5")
    enc, cl = d4.open_stage("encode"), d4.open_stage("cluster")
    cube = py4DSTEM.read(file, datapath="emscale/denoised")
    assert type(cube).__name__ == "DataCube" and cube.data.shape == (8, 8, 64, 64)
    np.testing.assert_array_equal(cube.data, enc["denoised"].values)
    cal = cube.calibration
    assert cal.get_R_pixel_size() == pytest.approx(float(enc["y"][1] - enc["y"][0]))
    assert cal.get_R_pixel_units() == "nm"
    step = float(enc["ky"][1] - enc["ky"][0])  # 1/nm in the store, A^-1 in py4DSTEM
    assert cal.get_Q_pixel_size() == pytest.approx(step / 10) and cal.get_Q_pixel_units() == "A^-1"
    phase = py4DSTEM.read(file, datapath="emscale/phase")
    assert type(phase).__name__ == "RealSlice"
    np.testing.assert_array_equal(phase.data, cl["phase"].values)
    means = py4DSTEM.read(file, datapath="emscale/phase_mean_signal")
    assert type(means).__name__ == "DiffractionSlice"
    np.testing.assert_array_equal(np.moveaxis(means.data, -1, 0), cl["phase_mean_signal"].values)


class _Largest(Callback):
    """The largest result any task of a computation held: a whole-scan array would show."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def _posttask(self, key, result, dsk, state, id):
        self.largest = max(self.largest, getattr(result, "nbytes", 0))


@pytest.mark.parametrize("fmt", ["py4dstem", "npy"])
def test_the_denoised_scan_is_written_chunk_by_chunk(d4, tmp_path, fmt):
    scan = d4.open_stage("encode")["denoised"]
    assert len(scan.data.chunks[0]) > 1
    with _Largest() as seen:
        out = export_results(d4.path, fmt, tmp_path / fmt, stages=("encode",))
    assert 0 < seen.largest <= scan.nbytes / 2
    if fmt == "npy":  # blocks of rows and tiles, each at its place in the file
        np.testing.assert_array_equal(np.load(out / "denoised.npy"), scan.values)


def test_tiff_png_and_npy_carry_the_pixel_size_and_values(eels, tmp_path):
    import hyperspy.api as hs

    cl = eels.open_stage("cluster")
    step = float(cl["x"][1] - cl["x"][0])
    tif = export_results(eels.path, "tiff", tmp_path / "tif")
    with tifffile.TiffFile(tif / "phase.tif") as f:
        np.testing.assert_array_equal(f.asarray(), cl["phase"].values)
        num, den = f.pages[0].tags["XResolution"].value
        assert den / num == pytest.approx(step, rel=1e-4)
        assert f.imagej_metadata["unit"] == "nm"
    assert hs.load(tif / "phase.tif").axes_manager.signal_axes[0].scale == pytest.approx(step)
    manifest = json.loads((tif / "export.json").read_text())
    assert any(s["variable"] == "phase_mean_signal" for s in manifest["not_exported"])
    png = export_results(eels.path, "png", tmp_path / "png", stages=("cluster",))
    assert (png / "phase.png").read_bytes()[:4] == b"\x89PNG"
    key = next(f for f in json.loads((png / "export.json").read_text())["files"]
               if f["variable"] == "phase")["colours"]
    assert key["0"] == "#1f77b4"  # matplotlib's first colour: phase 0 in the spectra's plot too
    npy = export_results(eels.path, "npy", tmp_path / "npy")
    np.testing.assert_array_equal(np.load(npy / "phase.npy"), cl["phase"].values)
    entry = next(f for f in json.loads((npy / "export.json").read_text())["files"]
                 if f["variable"] == "phase_mean_signal")
    assert entry["dims"] == ["cluster", "energy"] and entry["axes"][1]["units"] == "eV"


def test_plain_xarray_opens_every_group_without_a_warning(eels):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for stage in eels.stages():
            grouped = xr.open_zarr(eels.path, group=stage)
            alone = xr.open_zarr(eels.path / stage)
            assert grouped.attrs["stage"] == alone.attrs["stage"] == stage
        tree = xr.open_datatree(eels.path, engine="zarr", chunks={})
    assert {"pca", "encode", "anomaly", "cluster"} <= set(tree.children)
    assert tree["cluster"]["y"].attrs["units"] == "nm"
    assert tree["train"]["epoch_seconds"].attrs["units"] == "s"
    assert "description" in tree["cluster"]["phase"].attrs
    assert tree["pca"].attrs["config_hash"] == eels.stage_attrs("pca")["config_hash"]
    results = open_results(eels.path.parent)  # the one-liner, from the run's directory
    assert isinstance(results, xr.DataTree) and "features" in results["preprocess"]
    assert results.attrs["provenance"]["seed"] == 0


def test_export_refusals_name_what_is_wrong(eels, tmp_path, capsys):
    scan = eels.path.parent / "scan.zarr"
    cases = [
        (["export", str(scan), "--to", "hspy"], "not a results store"),
        (["export", str(eels.path), "--to", "py4dstem"], "spectrum image"),
        (["export", str(eels.path), "--to", "jpeg"], "--to: 'jpeg' is not a format"),
        (["export", str(eels.path), "--to", "npy", "--stage", "phases"], "--stage: phases"),
        (["export", str(eels.path), "--to", "npy", "--out", str(eels.path / "x")],
         "lies inside the input"),
    ]
    for args, message in cases:
        assert main(args) == 1
        assert message in capsys.readouterr().err
    assert main(["export", str(eels.path), "--to", "npy", "--out", str(tmp_path / "e"),
                 "--stage", "cluster"]) == 0
    assert main(["export", str(eels.path), "--to", "npy", "--out", str(tmp_path / "e")]) == 1
    assert "exists already" in capsys.readouterr().err
    assert main(["export", str(eels.path), "--to", "npy", "--out", str(tmp_path / "e"),
                 "--overwrite"]) == 0
    assert (tmp_path / "e" / "denoised.npy").is_file()
