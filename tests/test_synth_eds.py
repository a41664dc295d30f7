"""The synthetic EDS generator (emscale synth eds) and the EDS and generic spectrum-image
workflows run end to end on small scans."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from emscale.errors import ConfigError
from emscale.store import ChunkPolicy, open_scan, validate_scan, write_scan
from emscale.synth.eds import ELEMENTS, EDSGenerator, fwhm_kev, synth_eds

SMALL = ChunkPolicy(target_mib=0.5)
WORKFLOWS = Path(__file__).parent.parent / "workflows"


@pytest.fixture(scope="module")
def scan():
    import dask

    with dask.config.set(scheduler="synchronous"):
        ds = synth_eds((40, 48), anomaly=True, seed=3, policy=SMALL)
        return ds, ds.compute()


def _mean(ds, label):
    return ds.clean.values[ds.label.values == label].mean(0)


def _at(e, spectrum, kev):
    return spectrum[np.argmin(np.abs(e - kev))]


def test_contract_and_ground_truth(scan):
    lazy, ds = scan
    assert validate_scan(lazy) == "spectrum"
    assert lazy.signal.dims == ("y", "x", "energy") and lazy.signal.dtype == np.uint16
    assert len(lazy.signal.chunks[0]) > 1, "generated in several navigation blocks"
    assert ds.energy.attrs["units"] == "keV" and ds.energy.values[0] == pytest.approx(-0.2)
    assert ds.energy.values[-1] == pytest.approx(20.0) and ds.attrs["signal_type"] == "EDS"
    assert set(np.unique(ds.label.values)) == {-1, 0, 1, 2, 3}
    assert ds.attrs["phase_names"] == ["austenite", "sigma", "M23C6 carbide", "Cr2O3 surface"]
    assert ((ds.label == -1) == (ds.anomaly_kind > 0)).all()
    assert (ds.label.values[:3] == 3).mean() > 0.5, "the oxide layer along the top edge"


def test_lines_at_their_energies_and_phases_by_composition(scan):
    _, ds = scan
    e = ds.energy.values
    austenite, sigma, carbide, oxide = (_mean(ds, p) for p in range(4))
    k = (e > 5.0) & (e < 8.0)
    assert 6.3 < e[k][np.argmax(austenite[k])] < 6.5, "Fe K-alpha 6.40 keV the strongest"
    assert 5.3 < e[k][np.argmax(carbide[k])] < 5.5, "Cr K-alpha 5.41 keV in the carbide"
    ni = _at(e, austenite, 7.478) / _at(e, austenite, 6.404)
    assert ni > 2 * _at(e, sigma, 7.478) / _at(e, sigma, 6.404), "Ni-rich austenite"
    assert _at(e, carbide, 2.293) > 2 * _at(e, austenite, 2.293), "Mo L in the carbide"
    assert _at(e, oxide, 0.525) > 3 * _at(e, austenite, 0.525), "O K-alpha in the oxide"
    assert _at(e, austenite, 0.0) > 5 * _at(e, austenite, 0.2), "the detector's zero peak"
    ga = ds.clean.values[ds.anomaly_kind.values == 1].mean(0)
    assert _at(e, ga, 9.251) > 5 * _at(e, austenite, 9.251), "Ga from the FIB"
    assert _at(e, austenite, 8.048) > 1.5 * _at(e, austenite, 8.6), "the grid's Cu K-alpha"


def test_resolution_grows_with_energy():
    """130 eV FWHM at Mn K-alpha; a line's measured width follows fwhm_kev."""
    assert fwhm_kev(5.899) * 1000 == pytest.approx(130, abs=2)
    assert fwhm_kev(0.525) < fwhm_kev(6.404) < fwhm_kev(17.479)
    gen = EDSGenerator((2, 2), channels=4096, seed=0)
    e, spectrum = gen.energy, gen.clean_block(0, 1, 0, 1)[0, 0].astype(float)
    window = (e > 6.1) & (e < 6.75)  # Fe K-alpha, Ni L and K far away
    line = spectrum[window] - np.linspace(spectrum[window][0], spectrum[window][-1], window.sum())
    above = e[window][line > line.max() / 2]
    assert above[-1] - above[0] == pytest.approx(fwhm_kev(6.404), rel=0.08)


def test_dose_and_poisson_counts(scan):
    _, ds = scan
    normal = ds.label.values >= 0
    totals = ds.clean.values[normal].sum(-1)
    assert 700 < totals.mean() < 1300, "about 1000 counts per spectrum by default"
    resid = ds.signal.values[normal].astype(float) - ds.clean.values[normal]
    e = ds.energy.values
    fe = (e > 6.3) & (e < 6.5)
    assert resid[:, fe].var() / ds.clean.values[normal][:, fe].mean() == pytest.approx(1, abs=0.1)


def test_deterministic_seeded_and_blockwise(sync_scheduler):
    a = synth_eds((16, 16), channels=128, seed=5, policy=SMALL).signal.values
    b = synth_eds((16, 16), channels=128, seed=5, policy=SMALL).signal.values
    c = synth_eds((16, 16), channels=128, seed=6, policy=SMALL).signal.values
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    gen = EDSGenerator((20, 20), channels=128, seed=1, anomaly=True)
    whole = gen.clean_block(0, 20, 0, 20)
    np.testing.assert_allclose(gen.clean_block(5, 12, 3, 17), whole[5:12, 3:17], rtol=1e-6)


def test_cli_writes_a_store_whose_clean_signal_is_regenerated(tmp_path, capsys):
    from emscale.cli import main

    out = tmp_path / "eds.zarr"
    assert main(["synth", "eds", str(out), "--shape", "12", "10", "--channels", "128",
                 "--anomaly", "--seed", "2", "--dose", "500"]) == 0
    assert "EDS spectrum image 12 x 10 x 128" in capsys.readouterr().out
    ds = open_scan(out)
    assert ds.attrs["generator"]["name"] == "eds" and ds.attrs["generator"]["dose"] == 500
    gen = EDSGenerator((12, 10), channels=128, anomaly=True, seed=2, dose=500)
    np.testing.assert_allclose(ds.clean.values, gen.clean_block(0, 12, 0, 10), rtol=1e-6)


@pytest.mark.parametrize("kwargs, field", [
    (dict(shape=(0, 4)), "shape"), (dict(channels=8), "channels"), (dict(dose=0), "dose"),
    (dict(energy_range=(0.0, 5.0)), "energy_range"), (dict(layout="rings"), "layout"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        EDSGenerator(**kwargs)


def test_the_elements_lines_are_the_tabulated_ones():
    lines = {el: [e for e, _w in table] for el, (_z, _d, table) in ELEMENTS.items()}
    assert lines["Fe"][0] == 6.404 and lines["Cr"][0] == 5.415 and lines["Ni"][0] == 7.478
    assert lines["O"] == [0.525] and lines["Mo"][0] == 2.293


# --- the workflows, end to end on 12 x 10 scans ---------------------------------------------------

@pytest.fixture(scope="module")
def small_scans(tmp_path_factory):
    from emscale.synth.eels import synth_eels

    root = tmp_path_factory.mktemp("scans")
    policy = ChunkPolicy(target_mib=0.01)
    write_scan(synth_eds((12, 10), channels=256, anomaly=True, seed=1, policy=policy),
               root / "eds.zarr", policy=policy)
    write_scan(synth_eels((12, 10), channels=256, seed=1, policy=policy), root / "eels.zarr",
               policy=policy)
    return root


@pytest.mark.parametrize("workflow, scan", [("eds-phase-mapping", "eds"),
                                            ("spectrum-image", "eels")])
def test_spectrum_workflows_run_end_to_end(workflow, scan, small_scans, tmp_path):
    """The shipped EDS workflow on a keV axis, and the generic one on an eV axis (its run on EDS
    is the same code: left out for the suite's time): every stage runs and the phase map covers
    the scan (the report left out: its time is its own)."""
    from emscale.results import ResultsStore
    from emscale.runner import run_workflow
    from emscale.workflow import validate_workflow

    data = yaml.safe_load((WORKFLOWS / f"{workflow}.yaml").read_text())
    data.update(input=str(small_scans / f"{scan}.zarr"), output=str(tmp_path / "out"))
    data["train"].update(epochs=2, tile=4, threads=1)
    data["cluster"].update(k_range=[2, 3], n_init=1, sample_size=1000)
    result = run_workflow(validate_workflow(data), echo=lambda *a: None,
                          report=False)
    results = ResultsStore(result.results)
    phase = results.open_stage("cluster")["phase"].values
    assert phase.shape == (12, 10) and (phase >= 0).mean() > 0.8
    features = results.open_stage("pca")["pca_components"]
    if workflow == "eds-phase-mapping":  # channels below 0.2 keV dropped, nothing else
        energy = features["energy"].values
        assert energy[0] >= 0.2 and energy[-1] == pytest.approx(20.0)


def test_a_workflow_generates_an_eds_scan(tmp_path):
    from emscale.runner import run_workflow
    from emscale.workflow import validate_workflow

    wf = validate_workflow({"synth": {"kind": "eds", "shape": [8, 6], "channels": 128, "seed": 4},
                            "output": str(tmp_path / "out"),
                            "preprocess": {"steps": [{"step": "crop", "start": 0.2}]}})
    run_workflow(wf, until="scan", echo=lambda *a: None)
    ds = open_scan(tmp_path / "out" / "scan.zarr")
    assert ds["energy"].attrs["units"] == "keV" and ds.sizes["energy"] == 128


def test_energy_ranges_on_an_uncalibrated_axis_are_warned(tmp_path, caplog):
    """An EDS workflow's keV ranges on a raw array without calibration are channel numbers:
    said before anything runs (the run itself would 'work')."""
    from emscale.runner import check_against_scan
    from emscale.stages import REGISTRY
    from emscale.workflow import load_workflow

    raw = tmp_path / "raw.npy"
    np.save(raw, np.random.default_rng(0).poisson(5, (40, 40, 128)).astype(np.uint16))
    wf = load_workflow(WORKFLOWS / "eds-phase-mapping.yaml", input=raw, output=tmp_path / "o")
    check_against_scan(wf, REGISTRY, None)
    assert "its energy range is read as channel numbers" in caplog.text
    assert "--axis energy:" in caplog.text
