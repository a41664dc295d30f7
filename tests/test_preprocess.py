import dask.array as da
import numpy as np
import pytest
import xarray as xr

from emscale.errors import ConfigError, InputError
from emscale.results import ResultsStore
from emscale.stages.preprocess import Preprocessor, write_preprocess_stage
from emscale.steps import Bin, shift_patterns


def spectrum_scan(data, energy=None, chunks=(3, -1, -1)):
    ny, nx, ne = data.shape
    energy = np.linspace(400.0, 800.0, ne) if energy is None else energy
    return xr.Dataset({"signal": (("y", "x", "energy"), da.from_array(data, chunks=chunks))},
                      coords={"energy": ("energy", energy, {"units": "eV"}),
                              "y": np.arange(ny) * 2.0, "x": np.arange(nx) * 2.0},
                      attrs={"kind": "spectrum"})


def diffraction_scan(data, chunks=(2, 3, -1, -1)):
    return xr.Dataset({"signal": (("y", "x", "ky", "kx"), da.from_array(data, chunks=chunks))},
                      attrs={"kind": "diffraction"})


def run(scan, steps, **kw):
    pre = Preprocessor(steps, **kw).fit(scan)
    return pre, pre.transform(scan).compute()


def poisson_spectra(seed=0, shape=(7, 5, 64)):
    rng = np.random.default_rng(seed)
    return rng.poisson(50.0, size=shape).astype(np.uint16)


# -- spectrum steps against numpy references ------------------------------------------------


def test_crop_and_bin_keep_coordinates(sync_scheduler):
    data = poisson_spectra()
    scan = spectrum_scan(data)
    e = scan.energy.values
    _, out = run(scan, [{"step": "crop", "start": 500, "stop": 700}, {"step": "bin", "factor": 3}])
    keep = (e >= 500) & (e <= 700)
    cropped = data[..., keep].astype(np.float32)
    m = cropped.shape[-1] // 3
    expected = cropped[..., : 3 * m].reshape(7, 5, m, 3).sum(-1)
    np.testing.assert_array_equal(out.features.values, expected)
    np.testing.assert_allclose(out.energy.values, e[keep][: 3 * m].reshape(m, 3).mean(1))
    assert out.features.dtype == np.float32 and out.features.dims == ("y", "x", "energy")
    assert out.energy.attrs["units"] == "eV"


def test_background_removes_a_power_law(sync_scheduler):
    e = np.linspace(400.0, 800.0, 200)
    amp = np.linspace(1e6, 3e6, 12).reshape(3, 4, 1)
    r = np.linspace(2.5, 3.5, 12).reshape(3, 4, 1)
    edge = np.where(e > 600, 200.0, 0.0)
    data = (amp * 1e6 * e ** -r + edge).astype(np.float32)
    _, out = run(spectrum_scan(data, e), [{"step": "background", "window": [450, 580]}])
    f = out.features.values
    assert np.abs(f[..., e < 590]).max() < 1e-2 * data[..., e < 590].min()  # background gone
    np.testing.assert_allclose(f[..., e > 620], 200.0, rtol=2e-3)  # the edge is kept


def test_normalize_sum_and_max(sync_scheduler):
    data = poisson_spectra(1)
    data[0, 0] = 0  # an all-zero pixel is left alone, not divided by zero
    scan = spectrum_scan(data)
    _, s = run(scan, [{"step": "normalize", "method": "sum"}])
    _, m = run(scan, [{"step": "normalize", "method": "max"}])
    np.testing.assert_allclose(s.features.values[1:].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(m.features.values[1:].max(-1), 1.0, rtol=1e-6)
    assert (s.features.values[0, 0] == 0).all() and s.valid.values.all()


def test_a_crop_of_unsigned_counts_first_and_an_in_place_normalise_change_nothing(sync_scheduler):
    """The chain's shortcuts (a leading crop before the float32 conversion of unsigned counts,
    normalise overwriting only arrays the chain owns) give the features of the plain chain,
    and a float32 scan's blocks are never written to."""
    data = poisson_spectra(2)
    steps = [{"step": "crop", "start": 500, "stop": 700}, {"step": "normalize", "method": "sum"}]
    as_float = data.astype(np.float32)
    original = as_float.copy()
    _, counts = run(spectrum_scan(data), steps)
    _, floats = run(spectrum_scan(as_float), steps)
    np.testing.assert_array_equal(counts.features.values, floats.features.values)
    np.testing.assert_array_equal(as_float, original)
    _, alone = run(spectrum_scan(as_float), [{"step": "normalize", "method": "sum"}])
    np.testing.assert_array_equal(as_float, original)
    np.testing.assert_allclose(alone.features.values, original / original.sum(-1, keepdims=True),
                               rtol=1e-6)


def test_anscombe_stabilises_poisson_variance(sync_scheduler):
    rng = np.random.default_rng(2)
    lam = np.geomspace(5, 500, 32)
    data = rng.poisson(lam, size=(100, 100, 32)).astype(np.uint16)
    _, out = run(spectrum_scan(data, chunks=(30, -1, -1)), [{"step": "anscombe"}])
    var = out.features.values.reshape(-1, 32).var(axis=0)
    assert np.abs(var - 1).max() < 0.1, var  # raw variance spans 5..500


def test_poisson_weight_gives_unit_noise_variance(sync_scheduler):
    """Keenan-Kotula weighting must actually change the data (hyperspy issue 3607): for Poisson
    counts of a rank-one scan (pixel intensity x spectrum shape) the weighted noise variance is ~1
    in every channel, whatever the channel's mean."""
    rng = np.random.default_rng(3)
    spectrum = np.geomspace(2, 400, 48)
    intensity = rng.uniform(0.5, 2.0, size=(40, 50, 1))
    data = rng.poisson(intensity * spectrum).astype(np.uint16)
    pre, out = run(spectrum_scan(data, chunks=(6, -1, -1)), [{"step": "poisson_weight"}])
    f = out.features.values.reshape(-1, 48)
    model = (intensity.reshape(-1, 1) * spectrum)
    g = data.reshape(-1, 48).sum(1) / data.reshape(-1, 48).sum(1).mean()
    resid = f - model / np.sqrt(g[:, None] * data.reshape(-1, 48).mean(0)[None, :])
    var = resid.var(axis=0)
    assert np.abs(var - 1).max() < 0.15, var
    raw_var = data.reshape(-1, 48).var(0)
    assert raw_var.max() / raw_var.min() > 50  # the raw data were far from it
    assert pre.provenance()["fitted"][0]["step"] == "poisson_weight"


def test_mask_channels_explicit_and_automatic(sync_scheduler):
    data = poisson_spectra(4).astype(np.float32)
    data[..., 10] = 0  # dead
    data[..., 40] += 5000  # hot
    scan = spectrum_scan(data)
    e = scan.energy.values
    pre, out = run(scan, [{"step": "mask_channels", "ranges": [[e[20], e[22]], e[30]], "auto": True}])
    kept = np.setdiff1d(np.arange(64), [10, 40, 20, 21, 22, 30])
    np.testing.assert_array_equal(out.energy.values, e[kept])
    np.testing.assert_array_equal(out.features.values, data[..., kept])
    fitted = pre.provenance()["fitted"][0]
    assert fitted["dead_channels"] == [10] and fitted["hot_channels"] == [40]


# -- diffraction steps ------------------------------------------------------------------------


def disk_patterns(centres, size=32, width=2.0):
    """A smooth central-beam spot per pattern (its centre of mass is exactly the given centre)."""
    ky, kx = np.mgrid[:size, :size]
    out = np.zeros((len(centres), size, size), np.float32)
    for i, (cy, cx) in enumerate(centres):
        out[i] = 1000.0 * np.exp(-((ky - cy) ** 2 + (kx - cx) ** 2) / (2 * width**2))
    return out


def com(p):
    ky, kx = np.mgrid[: p.shape[-2], : p.shape[-1]]
    t = p.sum((-2, -1))
    return (p * ky).sum((-2, -1)) / t, (p * kx).sum((-2, -1)) / t


def test_centre_com_moves_each_pattern_to_the_centre(sync_scheduler):
    rng = np.random.default_rng(5)
    centres = 15.5 + rng.uniform(-4, 4, size=(4 * 6, 2))
    data = disk_patterns(centres).reshape(4, 6, 32, 32)
    _, out = run(diffraction_scan(data), [{"step": "centre", "method": "com"}])
    cy, cx = com(out.features.values)
    assert np.abs(cy - 15.5).max() < 0.05 and np.abs(cx - 15.5).max() < 0.05


def test_centre_fit_removes_a_linear_descan(sync_scheduler):
    yy, xx = np.mgrid[:6, :8]
    centres = np.stack([12.0 + 0.5 * yy + 0.2 * xx, 14.0 - 0.3 * yy + 0.4 * xx], -1).reshape(-1, 2)
    data = disk_patterns(centres).reshape(6, 8, 32, 32)
    pre, out = run(diffraction_scan(data), [{"step": "centre", "method": "fit"}])
    plane = np.array(pre.provenance()["fitted"][0]["origin_plane"])
    np.testing.assert_allclose(plane, [[12.0, 14.0], [0.5, -0.3], [0.2, 0.4]], atol=0.05)
    cy, cx = com(out.features.values)
    assert np.abs(cy - 15.5).max() < 0.1 and np.abs(cx - 15.5).max() < 0.1


def test_shift_patterns_is_exact_for_integer_shifts():
    x = np.random.default_rng(6).random((3, 10, 12)).astype(np.float32)
    out = shift_patterns(x, np.array([1.0, 0.0, -2.0]), np.array([0.0, 3.0, 1.0]))
    np.testing.assert_array_equal(out[0, :-1], x[0, 1:])
    np.testing.assert_array_equal(out[1, :, :-3], x[1, :, 3:])
    np.testing.assert_array_equal(out[2, 2:, :-1], x[2, :-2, 1:])
    assert (out[0, -1] == 0).all()


def test_shift_patterns_is_bilinear_with_zeros_outside():
    # scipy's linear spline shift (order 1, constant 0 outside) is the reference; shifts from
    # sub-pixel to beyond the pattern, many patterns sharing an integer part, some alone
    from scipy.ndimage import shift

    rng = np.random.default_rng(8)
    x = rng.random((60, 9, 11)).astype(np.float32)
    dy = np.concatenate([rng.normal(0.3, 0.4, 40), rng.uniform(-14, 14, 20)])
    dx = np.concatenate([rng.normal(-0.6, 0.4, 40), rng.uniform(-14, 14, 20)])
    out = shift_patterns(x, dy, dx)
    for k in range(len(x)):
        expected = shift(x[k].astype(np.float64), (-dy[k], -dx[k]), order=1, mode="grid-constant")
        np.testing.assert_allclose(out[k], expected, atol=1e-5, err_msg=f"pattern {k}")


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_bin_sums_blocks_of_channels_and_of_pixels(factor, dtype):
    rng = np.random.default_rng(9)
    patterns = rng.poisson(3000, (4, 13, 14)).astype(dtype)  # 4 x 3000 > the uint16 range
    spectra = rng.poisson(3000, (5, 31)).astype(dtype)
    step = Bin(factor=factor)
    a, b, m = 13 // factor, 14 // factor, 31 // factor
    f64 = lambda v: v.astype(np.float64)  # noqa: E731
    np.testing.assert_array_equal(
        step.apply(patterns, None),
        f64(patterns)[:, :a * factor, :b * factor].reshape(4, a, factor, b, factor).sum((2, 4)))
    np.testing.assert_array_equal(step.apply(spectra, None),
                                  f64(spectra)[:, :m * factor].reshape(5, m, factor).sum(2))
    assert step.apply(patterns, None).dtype == np.float32


def test_diffraction_bin_crop_masks_and_scale(sync_scheduler):
    data = np.random.default_rng(7).poisson(20, size=(4, 6, 32, 32)).astype(np.uint16)
    steps = [{"step": "bin", "factor": 2}, {"step": "crop", "ky": [2, 14], "kx": [2, 14]},
             {"step": "beam_mask", "radius": 1.5}, {"step": "circular_crop", "radius": 5},
             {"step": "scale", "method": "log"}]
    _, out = run(diffraction_scan(data), steps)
    binned = data.astype(np.float32).reshape(4, 6, 16, 2, 16, 2).sum((3, 5))[:, :, 2:14, 2:14]
    r = np.hypot(*np.mgrid[:12, :12] - 5.5)
    expected = np.where((r <= 1.5) | (r > 5), 0, np.log1p(binned))
    np.testing.assert_allclose(out.features.values, expected, rtol=1e-6)
    assert out.features.dims == ("y", "x", "ky", "kx")


# -- value policy -----------------------------------------------------------------------------


def test_nonfinite_pixels_are_masked_and_counted(sync_scheduler):
    data = poisson_spectra(8).astype(np.float32)
    data[2, 3, 5] = np.nan
    data[4, 1, :3] = np.inf
    data[0, 0, 7] = -4.0
    _, out = run(spectrum_scan(data), [{"step": "anscombe"}])
    valid = out.valid.values
    assert not valid[2, 3] and not valid[4, 1] and valid.sum() == valid.size - 2
    assert (out.features.values[~valid] == 0).all() and np.isfinite(out.features.values).all()
    assert int(out.nonfinite_count.sum()) == 4 and int(out.negative_count.sum()) == 1
    assert out.features.values[0, 0, 7] == pytest.approx(2 * np.sqrt(3 / 8))  # clipped to 0


def test_nonfinite_error_names_the_chunk(sync_scheduler):
    data = poisson_spectra(9).astype(np.float32)
    data[4, 2, 1] = np.nan
    with pytest.raises(InputError, match=r"chunk y 3:6, x 0:5: 1 NaN/inf"):
        run(spectrum_scan(data), [], nonfinite="error")


def test_negative_error_and_keep(sync_scheduler):
    data = poisson_spectra(10).astype(np.float32)
    data[1, 1, 1] = -2
    with pytest.raises(InputError, match="negative"):
        run(spectrum_scan(data), [], negative="error")
    _, out = run(spectrum_scan(data), [], negative="keep")
    assert out.features.values[1, 1, 1] == -2


# -- configuration errors ---------------------------------------------------------------------


@pytest.mark.parametrize("steps, kw, match", [
    ([{"step": "smooth"}], {}, r"steps\[0\]\.step: must be one of .*got 'smooth'"),
    ([{"step": "bin", "factr": 2}], {}, r"steps\[0\]\.factr: unknown parameter"),
    ([{"step": "crop", "start": 0}, {"step": "bin", "factor": 0}], {}, r"steps\[1\]\.factor"),
    ([{"step": "crop", "start": 900, "stop": 1000}], {}, r"steps\[0\]\.start: range"),
    ([{"step": "background", "window": [100, 101]}], {}, r"steps\[0\]\.window"),
    ([{"step": "centre"}], {}, r"steps\[0\]\.step: 'centre' does not apply to a spectrum"),
    ([{"step": "normalize", "method": "l2"}], {}, r"steps\[0\]\.method"),
    ([{"step": "anscombe"}, {"step": "poisson_weight"}], {}, "choose one"),
    (["bin"], {}, r"steps\[0\]: must be a mapping"),
    ([], {"nonfinite": "ignore"}, "preprocess.nonfinite"),
    ([], {"negative": "abs"}, "preprocess.negative"),
])
def test_bad_configuration_names_the_field(steps, kw, match):
    with pytest.raises(ConfigError, match=match):
        Preprocessor(steps, **kw).fit(spectrum_scan(poisson_spectra()))


# -- blockwise on the cluster, written as a stage ----------------------------------------------


EELS_CHAIN = [{"step": "crop", "start": 500, "stop": 780}, {"step": "bin", "factor": 2},
              {"step": "mask_channels", "auto": True}, {"step": "poisson_weight"},
              {"step": "normalize", "method": "max"}]


def test_chain_on_local_cluster_equals_single_block(local_client, tmp_path):
    from emscale.store import ChunkPolicy
    from emscale.synth.eels import synth_eels

    scan = synth_eels((23, 17), channels=256, anomaly=True, seed=3, policy=ChunkPolicy(target_mib=0.05))
    assert len(scan.signal.chunks[0]) > 3
    one_block = scan.chunk({"y": -1, "x": -1})
    expected = Preprocessor(EELS_CHAIN).fit_transform(one_block).features.compute(scheduler="sync")
    results = ResultsStore(tmp_path / "r.zarr")
    written = write_preprocess_stage(results, scan, Preprocessor(EELS_CHAIN))
    np.testing.assert_allclose(written.features.values, expected.values, rtol=2e-6, atol=1e-7)
    assert written.attrs["value_counts"] == {"nonfinite_values": 0, "negative_values": 0,
                                             "nonfinite_after_steps": 0, "invalid_pixels": 0}
    assert [s["step"] for s in written.attrs["preprocess"]["steps"]] == [s["step"] for s in EELS_CHAIN]
    assert results.stages() == ["preprocess"]


def test_refused_stage_leaves_nothing(tmp_path, sync_scheduler):
    data = poisson_spectra(11).astype(np.float32)
    data[6, 4, 0] = np.inf
    results = ResultsStore(tmp_path / "r.zarr")
    with pytest.raises(InputError, match="chunk y 6:7"):
        write_preprocess_stage(results, spectrum_scan(data), Preprocessor([], nonfinite="error"))
    assert results.stages() == [] and sorted(p.name for p in results.path.iterdir()) == ["zarr.json"]


def test_review_edge_cases(sync_scheduler):
    """Blocks without a valid pixel, refitting, energies below zero, end-channel spikes."""
    data = poisson_spectra(12, shape=(4, 4, 64)).astype(np.float32)
    data[:2, :2, 0] = np.nan  # one whole block invalid
    scan = spectrum_scan(data, chunks=(2, 2, -1))
    _, out = run(scan, [{"step": "poisson_weight"}])
    assert (~out.valid.values).sum() == 4 and np.isfinite(out.features.values).all()

    # two chains fitted on different scans do not share dask keys (fitted state is tokenised)
    a, b = spectrum_scan(poisson_spectra(13)), spectrum_scan(2 * poisson_spectra(14))
    fa = Preprocessor([{"step": "poisson_weight"}]).fit(b).transform(a).features
    fb = Preprocessor([{"step": "poisson_weight"}]).fit(a).transform(a).features
    assert fa.data.name != fb.data.name

    e = np.linspace(-10.0, 300.0, 64)
    _, out = run(spectrum_scan(poisson_spectra(15), e), [{"step": "background", "window": [100, 200]}])
    assert np.abs(out.features.values).max() < 1e4  # no power law extrapolated to E <= 0

    spiky = poisson_spectra(16).astype(np.float32)
    spiky[..., 0] += 5000
    pre, _ = run(spectrum_scan(spiky), [{"step": "mask_channels", "auto": True}])
    assert pre.provenance()["fitted"][0]["hot_channels"] == [0]


def _spot_pattern(n=64, rotation_deg=0.0):
    """A centred hexagonal spot pattern (six spots and the direct beam)."""
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
    out = np.exp(-(yy ** 2 + xx ** 2) / 6)
    for a in np.deg2rad(np.arange(0, 360, 60) + 11 + rotation_deg):
        out = out + np.exp(-((yy - 15 * np.sin(a)) ** 2 + (xx - 15 * np.cos(a)) ** 2) / 4)
    return out.astype(np.float32)


def test_polar_features_do_not_change_when_the_crystal_turns():
    """Issue 16: grains of one phase in other in-plane orientations get the same features."""
    from emscale.steps import make_step

    step = make_step({"step": "polar", "angles": 64, "harmonics": 16}, 0, "diffraction")
    step.prepare({"ky": np.arange(64) * 0.05, "kx": np.arange(64) * 0.05})
    assert {d: v.size for d, v in step.output_coords().items()} == {"radius": 32, "harmonic": 17}
    assert step.output_coords()["radius"][-1] == pytest.approx(31.5 * 0.05)
    pattern = _spot_pattern()
    base = step.apply(pattern[None], None)[0]
    assert base.shape == (32, 17) and base.dtype == np.float32
    turned = step.apply(np.rot90(pattern)[None].copy(), None)[0]  # a sample grid rotation
    np.testing.assert_allclose(turned, base, rtol=1e-5, atol=1e-7)
    for deg in (17.0, 33.0):  # between grid angles: only the bilinear resampling differs
        other = step.apply(_spot_pattern(rotation_deg=deg)[None], None)[0]
        assert np.abs(other - base).sum() < 0.06 * np.abs(base).sum()
        assert np.abs(_spot_pattern(rotation_deg=deg) - pattern).sum() > pattern.sum()
    # six-fold symmetry: the 6th harmonic carries the spots, the odd ones next to nothing
    ring = base[15]
    assert ring[6] > 10 * max(ring[1], ring[3], ring[5])


def test_polar_gives_the_orientation_of_the_crystal():
    """The orientation map: the spots turned by a give the orientation + a (modulo 60 degrees
    for six-fold patterns), and the symmetry 6."""
    from emscale.steps import make_step

    step = make_step({"step": "polar", "angles": 128, "harmonics": 16}, 0, "diffraction")
    step.prepare({"ky": np.arange(64) * 1.0, "kx": np.arange(64) * 1.0})
    turns = [0.0, 7.0, 17.0, 33.0, 50.0]
    _, maps = step.apply_maps(np.stack([_spot_pattern(rotation_deg=d) for d in turns]), None)
    assert maps["symmetry"].tolist() == [6] * len(turns)
    seen = maps["orientation"] - maps["orientation"][0]
    off = (seen - np.array(turns) + 30) % 60 - 30  # the difference, modulo the period
    assert np.abs(off).max() < 1.5, (maps["orientation"], turns)
    assert maps["orientation"][0] == pytest.approx(11, abs=1.5)  # the spots' own angle


@pytest.mark.parametrize("params, field", [({"angles": 5}, "angles"), ({"harmonics": 40}, "harmonics"),
                                           ({"radii": 1}, "radii")])
def test_polar_settings_are_checked(params, field):
    from emscale.steps import make_step

    with pytest.raises(ConfigError, match=rf"preprocess.steps\[2\].{field}"):
        make_step({"step": "polar", **params}, 2, "diffraction")  # before any data are read
    with pytest.raises(ConfigError, match="does not apply to a spectrum"):
        make_step({"step": "polar"}, 0, "spectrum")


def test_a_chain_ending_in_polar_gives_radius_by_harmonic_features(sync_scheduler):
    from emscale.synth.diffraction import synth_diffraction

    scan = synth_diffraction((8, 8), pattern=(64, 64), seed=0)
    steps = [{"step": "centre", "method": "com"}, {"step": "polar", "harmonics": 8}]
    out = Preprocessor(steps).fit_transform(scan)
    assert out["features"].dims == ("y", "x", "radius", "harmonic")
    assert out["features"].shape == (8, 8, 32, 9)
    # its maps, beside the stage's others
    assert out["polar_orientation"].dims == ("y", "x") and out["polar_orientation"].attrs["units"] == "degree"
    symmetry = out["polar_symmetry"].values
    assert ((symmetry >= 2) & (symmetry <= 8)).all()
    period = 360 / symmetry
    assert ((out["polar_orientation"].values >= 0) & (out["polar_orientation"].values < period)).all()
    from emscale import report  # the report's map of it

    shown = []
    report._orientation(lambda *a: shown.append(a), report._figure(), *[None] * 6, pre=out)
    (name, title, fig, caption), = shown
    assert name == "orientation" and "strongest angular harmonic" in caption
    assert "modulo" in fig.axes[0].get_title()
    assert np.isfinite(out["features"].values).all()


def test_compact_features_are_stored_and_a_crop_of_spectra_is_recomputed(tmp_path, sync_scheduler):
    """store_features "auto": polar features (a few % of a pattern) are kept in the group, so the
    stages after preprocess skip the chain; a crop of spectra (half the scan) is rerun where
    read. A synthetic scan's clean features come from its scan either way, on the sampled
    pixels only."""
    import shutil

    from emscale.stages.preprocess import features_of, preprocess_stage
    from emscale.store import ChunkPolicy, open_scan, write_scan
    from emscale.synth.diffraction import synth_diffraction
    from emscale.synth.eels import synth_eels

    policy = ChunkPolicy(target_mib=0.25)
    write_scan(synth_diffraction((12, 10), pattern=(64, 64), seed=0, store_clean=True, policy=policy),
               tmp_path / "d.zarr", policy=policy)
    scan = open_scan(tmp_path / "d.zarr")
    steps = [{"step": "bin", "factor": 2}, {"step": "centre", "method": "com"},
             {"step": "scale", "method": "log"}, {"step": "polar", "harmonics": 8}]
    results = ResultsStore(tmp_path / "d-results.zarr")
    results.write_stage("preprocess", preprocess_stage(scan, Preprocessor(steps), "auto"))
    import zarr

    group = zarr.open_group(str(results.path / "preprocess"), mode="r")
    assert "features" in group and "clean_features" not in group
    stage = results.open_stage("preprocess")
    assert stage.attrs["features_stored"] is True
    expected = Preprocessor(steps).fit_transform(scan).compute()
    np.testing.assert_allclose(stage["features"].values, expected["features"].values, rtol=1e-6)
    sampled = features_of(stage, 2)
    assert sampled["features"].shape == (6, 5, 16, 9)
    clean = Preprocessor(steps).fit(scan).transform(scan.assign(signal=scan["clean"]), 2)
    np.testing.assert_allclose(sampled["clean_features"].values, clean["features"].values,
                               rtol=1e-6)
    shutil.rmtree(tmp_path / "d.zarr")  # stored: still readable without the scan
    np.testing.assert_allclose(results.open_stage("preprocess")["features"].values,
                               expected["features"].values, rtol=1e-6)

    write_scan(synth_eels((8, 6), channels=256, seed=1, policy=policy), tmp_path / "e.zarr",
               policy=policy)
    eels = open_scan(tmp_path / "e.zarr")
    crop = [{"step": "crop", "start": 500, "stop": 700}, {"step": "normalize"}]
    stage = preprocess_stage(eels, Preprocessor(crop), "auto")
    assert "features" not in stage and stage.attrs["features_stored"] is False
    assert "features" in preprocess_stage(eels, Preprocessor(crop), True)
