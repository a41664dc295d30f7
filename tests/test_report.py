"""The report explains itself (issue 19): a summary first, maps in the scan's calibrated
coordinates with a scale bar ("pixels" where it has none), the anomaly outline on the phase map,
legends and colour bars with units, the scree's elbow against the k compared, early stopping
marked. One tiny run's results store, reused; the rest on hand-made stages."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr

from emscale import report
from emscale.results import ResultsStore

STAGES = ("pca", "train", "encode", "anomaly", "cluster")


@pytest.fixture(scope="module")
def run(small_eels_run):
    return small_eels_run


def _sections(section, stages: dict, **kwargs) -> dict:
    """What one of the report's section functions adds: {name: (figure, caption)}."""
    out = {}
    section(lambda name, title, fig, caption="": out.__setitem__(name, (fig, caption)),
            report._figure(), *(stages.get(n) for n in STAGES), {}, **kwargs)
    return out


def _stages(run) -> dict:
    results = ResultsStore(run.results)
    return {n: results.open_stage(n) for n in STAGES + ("preprocess",)}


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_report_opens_with_a_summary_of_the_scan_and_what_was_found(run):
    page = run.report.read_text()
    start = page.index("<h2>Summary</h2>")
    assert start < page.index("<h2>PCA scree</h2>")
    summary = re.sub(r"<[^>]+>", " ", page[start:page.index("</table>", start)])
    stages = _stages(run)
    cl, an, train = stages["cluster"], stages["anomaly"], stages["train"]
    k = cl.attrs["phase"]["n_clusters"]
    assert "synthetic: emscale synth eels, seed 2" in summary
    assert "EELS spectrum image" in summary
    assert "12 x 10 pixels, 12 x 10 nm (1 nm per pixel); 96 channels per pixel, 480-800 eV" \
        in summary
    assert f"K = {k} by the elbow of the k-means inertia over K = 2-3 (cluster.k_range)" in summary
    assert f"{float(an['anomaly'].mean()):.2%} of the pixels flagged" in summary
    assert "Minor phases" in summary and "Warnings" in summary
    epochs = train.sizes["epoch"]
    assert f"mlp, latent size 3, all {epochs} epochs" in summary
    assert re.search(r"Time\s+[\d.]+ s: the stages scan to cluster", summary), summary


def test_maps_are_calibrated_with_a_scale_bar_legends_and_the_anomaly_outline(run):
    stages = _stages(run)
    out = _sections(report._phases, stages, pre=stages["preprocess"])
    fig, caption = out["phases"]
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x (nm)", "y (nm)")
    assert ax.get_xlim() == (-0.5, 9.5)  # pixel edges in nm (1 nm per pixel)
    assert [a.get_gid() for a in ax.artists] == ["scale bar: 2 nm"]
    flagged = float(stages["anomaly"]["anomaly"].mean())
    assert flagged > 0 and f"flagged anomalous: {flagged:.1%}" in _legend(ax)
    assert "Black outlines: pixels flagged anomalous" in caption
    latent = out["latent"][0].axes[0]
    assert [t for t in _legend(latent) if t.startswith("phase 0: ")]
    spectra = out["phase_mean"][0].axes[0]
    assert spectra.get_xlabel() == "energy loss (eV)"
    assert spectra.get_ylabel() == "mean preprocessed signal (a.u.)"
    anomaly = _sections(report._anomalies, stages)["anomaly"][0]
    assert anomaly.axes[0].get_xlabel() == "x (nm)" and anomaly.axes[2].get_ylabel()  # colour bar


def test_the_scree_says_which_k_is_the_elbow_and_which_the_comparisons_use(run):
    stages = _stages(run)
    fig, caption = _sections(report._scree, stages)["scree"]
    elbow = stages["pca"].attrs["pca"]["suggested_k"]
    assert f"The elbow (k = {elbow})" in caption
    assert "use k = 3 instead: the autoencoder's latent size (train.latent_dim)" in caption
    assert any("k = 3: autoencoder latent size" in t for t in _legend(fig.axes[0]))


def _map(ny=6, nx=8, **coords):
    return xr.DataArray(np.zeros((ny, nx)), dims=("y", "x"), coords=coords)


def test_a_map_without_calibration_is_in_pixels_without_a_scale_bar():
    plt = report._figure()
    flat = np.arange(6.0), np.arange(8.0)
    for arr in (_map(), _map(y=("y", flat[0], {"units": "", "calibrated": False}),
                             x=("x", flat[1], {"units": "", "calibrated": False}))):
        fig, ax = plt.subplots()
        report._draw_map(ax, arr, arr.values)
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("x (pixels)", "y (pixels)")
        assert not ax.artists and ax.get_xlim() == (-0.5, 7.5)
    step = 2.5  # nm per pixel
    arr = _map(y=("y", 10 + step * flat[0], {"units": "nm"}),
               x=("x", step * flat[1], {"units": "nm"}))
    assert report._extent(arr) == (-1.25, 18.75, 23.75, 8.75)
    fig, ax = plt.subplots()
    report._draw_map(ax, arr, arr.values)
    assert [a.get_gid() for a in ax.artists] == ["scale bar: 2 nm"]
    assert [report._round_length(s) for s in (20, 128, 0.9, 3000)] == [2, 20, 0.1, 500]


def test_the_loss_curves_mark_an_early_stop_and_the_epoch_whose_weights_are_used():
    val = np.r_[np.linspace(1.0, 0.2, 8), np.full(10, 0.25)]  # best at epoch 8 (1-based)
    train = xr.Dataset({"train_loss": ("epoch", val / 2), "val_loss": ("epoch", val)},
                       attrs={"train": {"config": {"epochs": 30, "patience": 10, "loss": "mse"},
                                        "best_epoch": 7, "resumed_from": None}})
    fig, caption = _sections(report._loss, {"train": train})["loss"]
    assert caption.startswith("Training stopped early at epoch 18 of 30: the validation loss had "
                              "not improved for 10 epochs (train.patience); the weights of "
                              "epoch 8 (lowest validation loss) are used.")
    ax = fig.axes[0]
    assert ax.get_title() == "training: 18 of 30 epochs" and ax.get_xlim() == (0.5, 30.5)
    assert {"best: epoch 8 (weights used)", "not run: early stop at epoch 18"} <= set(_legend(ax))


def test_diffraction_mean_patterns_have_k_units_and_a_colour_bar():
    k = np.linspace(-1.6, 1.4, 16)
    cl = xr.Dataset(
        {"phase": (("y", "x"), np.repeat([[0, 1]], 4, axis=0).repeat(2, axis=1)),
         "phase_fraction": ("cluster", [0.5, 0.5]),
         "phase_mean_signal": (("cluster", "ky", "kx"),
                               np.random.default_rng(0).random((2, 16, 16)))},
        coords={"ky": ("ky", k, {"units": "1/nm"}), "kx": ("kx", k, {"units": "1/nm"})},
        attrs={"phase": {"n_clusters": 2, "chosen_by": "fixed"}})
    out = _sections(report._phases, {"cluster": cl})
    fig, caption = out["phase_mean"]
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("kx (1/nm)", "ky (1/nm)")
    assert fig.axes[0].get_xlim() == pytest.approx((-1.7, 1.5))
    assert fig.axes[-1].get_ylabel() == "mean preprocessed signal (a.u.)"  # the colour bar
    assert out["phases"][0].axes[0].get_xlabel() == "x (pixels)"
