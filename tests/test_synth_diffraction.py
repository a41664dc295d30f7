"""Synthetic 4D-STEM generator: contract, ground truth, determinism and the diffraction physics."""

from __future__ import annotations

import json

import dask
import numpy as np
import pytest
from scipy import ndimage

from emscale.errors import ConfigError
from emscale.store import ChunkPolicy, validate_scan
from emscale.synth.diffraction import DiffractionGenerator, synth_diffraction


@pytest.fixture(autouse=True)
def synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.fixture(scope="module")
def scan32():
    """The default-seed 32x32 scan with 64x64 patterns, computed once (about 25 MB)."""
    with dask.config.set(scheduler="synchronous"):
        return synth_diffraction(shape=(32, 32), seed=0).compute()


def test_variables_dims_and_dtypes():
    ds = synth_diffraction(shape=(6, 5), pattern=(64, 96))
    assert ds["signal"].dims == ("y", "x", "ky", "kx")
    assert ds["clean"].dims == ("y", "x", "ky", "kx")
    assert ds["label"].dims == ("y", "x") and ds["anomaly_kind"].dims == ("y", "x")
    assert ds["signal"].shape == ds["clean"].shape == (6, 5, 64, 96)
    assert ds["signal"].dtype == np.uint16
    assert ds["clean"].dtype == np.float32
    assert ds["label"].dtype == np.int16 and ds["anomaly_kind"].dtype == np.int8
    assert ds["ky"].attrs["units"] == "1/nm" and ds["x"].attrs["units"] == "nm"
    # the pattern centre is k = 0; both axes share one calibration
    assert ds["ky"].values[32] == 0.0 and ds["kx"].values[48] == 0.0
    assert np.isclose(np.diff(ds["ky"].values)[0], np.diff(ds["kx"].values)[0])
    computed = ds.compute()
    assert computed["signal"].dtype == np.uint16 and computed["clean"].dtype == np.float32
    assert computed["label"].dtype == np.int16 and computed["anomaly_kind"].dtype == np.int8


def test_construction_is_lazy_for_a_huge_scan():
    ds = synth_diffraction(shape=(1024, 1024), pattern=(256, 256))
    assert ds["clean"].nbytes == 256 * 2**30  # 256 GiB of float32, not computed
    assert len(ds["signal"].chunks[2]) == 1 and len(ds["signal"].chunks[3]) == 1


def test_contract_and_attrs(scan32):
    assert validate_scan(synth_diffraction(shape=(4, 4))) == "diffraction"
    attrs = synth_diffraction(shape=(4, 4), anomaly=True).attrs
    assert attrs["kind"] == "diffraction" and attrs["synthetic"] is True
    assert attrs["phase_names"] == ["vacuum", "amorphous", "cubic", "hexagonal"]
    assert attrs["anomaly_names"][0] == "none" and len(attrs["anomaly_names"]) == 3
    assert attrs["generator"]["pattern"] == [64, 64] and attrs["generator"]["anomaly"] is True
    assert attrs["source"] == {"path": None, "generator": "emscale synth 4dstem"}
    assert json.loads(json.dumps(attrs)) == attrs  # only JSON types, nothing numpy
    assert "anomaly_names" not in scan32.attrs


def test_all_four_phases_on_a_small_scan(scan32):
    labels = set(np.unique(scan32["label"].values).tolist())
    assert labels == {0, 1, 2, 3}
    assert not (scan32["anomaly_kind"].values != 0).any()


def test_same_seed_same_scan_other_seed_differs():
    a = synth_diffraction(shape=(8, 8), seed=3)["signal"].values
    b = synth_diffraction(shape=(8, 8), seed=3)["signal"].values
    c = synth_diffraction(shape=(8, 8), seed=4)["signal"].values
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_blocks_match_the_full_compute():
    ds = synth_diffraction(shape=(12, 10), seed=1, policy=ChunkPolicy(target_mib=0.5))
    clean, signal = ds["clean"].data, ds["signal"].data
    assert clean.numblocks[0] > 2
    full_clean, full_signal = clean.compute(), signal.compute()
    r0, r1 = clean.chunks[0][0], clean.chunks[0][1]
    np.testing.assert_array_equal(clean.blocks[1, 0].compute(), full_clean[r0:r0 + r1])
    np.testing.assert_array_equal(signal.blocks[0, 0].compute(), full_signal[:r0])
    np.testing.assert_array_equal(signal.blocks[1, 0].compute(), full_signal[r0:r0 + r1])
    # the noise-free signal and the truth do not depend on the chunking
    whole = synth_diffraction(shape=(12, 10), seed=1)
    assert whole["clean"].data.numblocks[:2] == (1, 1)
    np.testing.assert_allclose(whole["clean"].values, full_clean, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(whole["label"].values, ds["label"].values)


def _maxima_off_centre(pattern: np.ndarray, k: np.ndarray, k_min: float) -> int:
    """Local maxima above 1% of the pattern's peak, farther than ``k_min`` from the centre."""
    peaks = (pattern == ndimage.maximum_filter(pattern, size=3)) & (pattern > 0.01 * pattern.max())
    return int((peaks & (k > k_min)).sum())


def test_bragg_disks_in_crystals_not_in_vacuum(scan32):
    clean = scan32["clean"].values
    labels = scan32["label"].values
    ky, kx = np.meshgrid(scan32["ky"].values, scan32["kx"].values, indexing="ij")
    k = np.hypot(ky, kx)
    k_min = 1.5  # 1/nm: beyond the central disk (radius ~0.5 1/nm) and its halo's core
    vacuum = clean[0, 0]
    assert labels[0, 0] == 0
    assert _maxima_off_centre(vacuum, k, k_min) == 0
    assert vacuum[k > k_min].sum() == 0
    for phase in (2, 3):
        ys, xs = np.nonzero(labels == phase)
        scattered = clean[ys, xs][:, k > k_min].sum(axis=1)
        i = np.argmax(scattered)  # the most strongly diffracting pixel of the phase
        assert _maxima_off_centre(clean[ys[i], xs[i]], k, k_min) >= 4
    # the amorphous phase scatters into a diffuse ring at about 3.3 1/nm
    ys, xs = np.nonzero(ndimage.binary_erosion(labels == 1, iterations=3))  # away from grains
    amorphous = clean[ys[-1], xs[-1]]
    ring = (k > 2.8) & (k < 3.8)
    assert amorphous[ring].mean() > 3 * amorphous[(k > 4.2) & (k < 5.0)].mean()


def test_orientations_differ_between_grains_of_a_phase():
    gen = DiffractionGenerator(shape=(64, 64), seed=0)
    hexagonal = np.flatnonzero(gen.layout.grain_phase == 3)
    assert len(hexagonal) >= 2
    assert len(set(np.round(gen.layout.grain_orientation[hexagonal], 6))) == len(hexagonal)


def test_total_counts_near_dose_in_vacuum(scan32):
    vacuum = scan32["label"].values == 0
    totals = scan32["signal"].values[vacuum].sum(axis=(1, 2), dtype=np.int64)
    dose = scan32.attrs["generator"]["dose"]
    assert abs(totals.mean() / dose - 1) < 0.1
    # thicker specimen scatters some electrons beyond the detector, never more than the dose
    crystal = scan32["clean"].values[scan32["label"].values >= 2].sum(axis=(1, 2))
    assert (crystal <= dose * 1.0001).all() and crystal.mean() < dose


def test_anomalies_only_when_asked():
    ds = synth_diffraction(shape=(32, 32), anomaly=True)
    labels, kinds = ds["label"].values, ds["anomaly_kind"].values
    assert (labels == -1).any()
    np.testing.assert_array_equal(labels == -1, kinds > 0)
    assert set(np.unique(kinds).tolist()) <= {0, 1, 2} and len(np.unique(kinds)) >= 2
    plain = synth_diffraction(shape=(32, 32), anomaly=False)
    assert not (plain["label"].values == -1).any()


@pytest.mark.parametrize("size", [64, 128])
def test_pattern_sizes(size):
    ds = synth_diffraction(shape=(2, 3), pattern=(size, size))
    signal = ds["signal"].values
    assert signal.shape == (2, 3, size, size)
    assert signal.sum() > 0 and np.isfinite(ds["clean"].values).all()


@pytest.mark.parametrize("pattern", [(32, 32), (300, 300), (64, 32), (64,)])
def test_invalid_pattern(pattern):
    with pytest.raises(ConfigError, match="pattern"):
        synth_diffraction(shape=(4, 4), pattern=pattern)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"shape": (0, 4)}, "shape"), ({"dose": 0.0}, "dose"), ({"dose": -5}, "dose"),
     ({"read_noise": -1.0}, "read_noise")],
)
def test_invalid_parameters(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        synth_diffraction(**kwargs)


def test_read_noise_and_high_dose_choose_counts():
    ds = synth_diffraction(shape=(3, 3), dose=2e6, read_noise=2.0)
    assert ds["signal"].dtype == np.uint32
    assert ds["signal"].values.max() > np.iinfo(np.uint16).max
