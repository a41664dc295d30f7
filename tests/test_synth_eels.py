import numpy as np
import pytest

from emscale.errors import ConfigError
from emscale.store import ChunkPolicy, open_scan, validate_scan, write_scan
from emscale.synth.eels import EELSGenerator, synth_eels

SMALL = ChunkPolicy(target_mib=0.5)


@pytest.fixture(scope="module")
def scan():
    import dask

    with dask.config.set(scheduler="synchronous"):
        ds = synth_eels((40, 48), channels=512, anomaly=True, seed=3, policy=SMALL)
        return ds, ds.compute()


def test_contract_and_ground_truth(scan):
    lazy, ds = scan
    assert validate_scan(lazy) == "spectrum"
    assert lazy.signal.dims == ("y", "x", "energy") and lazy.signal.dtype == np.uint16
    assert len(lazy.signal.chunks[0]) > 1, "generated in several navigation blocks"
    assert ds.clean.dtype == np.float32 and ds.label.dims == ("y", "x")
    assert ds.energy.attrs["units"] == "eV"
    assert set(np.unique(ds.label.values)) == {-1, 0, 1, 2, 3}
    assert ds.attrs["phase_names"] == ["Fe2O3", "FeO", "Fe3O4", "surface"]
    assert ((ds.label == -1) == (ds.anomaly_kind > 0)).all()


def test_edges_at_physical_energies(scan):
    _, ds = scan
    e = ds.energy.values
    mean = ds.clean.where(ds.label >= 0).mean(("y", "x")).values
    # Fe-L3 white line maximum near 708-710 eV, L2 ~13 eV above, O-K onset rise at ~532 eV
    l3 = e[np.argmax(np.where((e > 700) & (e < 716), mean, 0))]
    assert 707.5 < l3 < 710.5
    l2 = e[np.argmax(np.where((e > 716) & (e < 730), mean, 0))]
    assert 720 < l2 < 724
    pre, post = mean[(e > 520) & (e < 527)].mean(), mean[(e > 534) & (e < 545)].mean()
    assert post > 1.3 * pre


def test_phases_differ_in_onset_and_ratio(scan):
    _, ds = scan
    e = ds.energy.values
    onsets = {}
    for p, name in enumerate(ds.attrs["phase_names"][:3]):
        spectra = ds.clean.values[ds.label.values == p]
        mean = spectra.mean(0)
        onsets[name] = e[np.argmax(np.where((e > 700) & (e < 716), mean, 0))]
    assert onsets["FeO"] < onsets["Fe3O4"] < onsets["Fe2O3"]


def test_dose_and_noise(scan):
    _, ds = scan
    e = ds.energy.values
    window = (e > 712) & (e < 718)
    edge = ds.clean.values[ds.label.values >= 0][:, window].mean()
    assert 35 < edge < 70, "about 50 counts per channel at the edge by default"
    resid = ds.signal.values.astype(float) - ds.clean.values
    # Poisson: variance tracks the mean (plus read noise 1)
    ratio = resid[..., window].var() / (ds.clean.values[..., window].mean() + 1.0)
    assert 0.85 < ratio < 1.15


def test_within_phase_variation_is_nonlinear(scan):
    _, ds = scan
    spectra = ds.clean.values[ds.label.values == 0]
    spectra = spectra / spectra.sum(1, keepdims=True)
    centred = spectra - spectra.mean(0)
    s = np.linalg.svd(centred, compute_uv=False) ** 2
    assert s[1] / s[0] > 1e-3, "more than one direction of variation inside a phase"


def test_deterministic_and_seeded(sync_scheduler):
    a = synth_eels((16, 16), channels=128, seed=5, policy=SMALL).signal.values
    b = synth_eels((16, 16), channels=128, seed=5, policy=SMALL).signal.values
    c = synth_eels((16, 16), channels=128, seed=6, policy=SMALL).signal.values
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_blocks_are_independent():
    gen = EELSGenerator((20, 20), channels=128, seed=1)
    whole = gen.clean_block(0, 20, 0, 20)
    np.testing.assert_allclose(gen.clean_block(5, 12, 3, 17), whole[5:12, 3:17], rtol=1e-6)


def test_written_store_round_trip(tmp_path, sync_scheduler):
    ds = synth_eels((16, 16), channels=128, anomaly=True, seed=1, policy=SMALL)
    write_scan(ds, tmp_path / "s.zarr", policy=SMALL)
    back = open_scan(tmp_path / "s.zarr")
    np.testing.assert_array_equal(back.signal.values, ds.signal.values)
    assert back.attrs["generator"]["seed"] == 1 and back.attrs["synthetic"] is True


@pytest.mark.parametrize("kwargs, field", [
    (dict(shape=(0, 4)), "shape"), (dict(channels=8), "channels"), (dict(dose=0), "dose"),
    (dict(energy_range=(600, 800)), "energy_range"), (dict(read_noise=-1), "read_noise"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        EELSGenerator(**kwargs)


def test_generation_memory_does_not_grow_with_scan_size(tmp_path):
    from emscale.bench.memory import run_measured

    over = {}
    for rows in (16, 160):  # ten times the scan, 0.25 MiB blocks
        out = tmp_path / f"s{rows}.zarr"
        m = run_measured(
            "from emscale.store import ChunkPolicy, write_scan\nfrom emscale.synth.eels import synth_eels",
            f"p = ChunkPolicy(0.25)\nwrite_scan(synth_eels(({rows}, 64), channels=256, policy=p), {str(out)!r}, policy=p)",
        )
        over[rows] = m["peak_rss"] - m["baseline_rss"]
    assert over[160] - over[16] < 25e6, over
