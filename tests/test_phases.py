"""Issue 6: blockwise encoding, anomaly scoring and phase clustering.

A small synthetic EELS material is made twice: a reference scan without anomalies (declared
normal; the autoencoder is trained on it) and a scan with anomalies (``label`` -1) to encode,
score and cluster. Quality is asserted against the ground truth with stated margins; the blockwise
results are compared with the same computation in memory.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from emscale.errors import ConfigError
from emscale.model_spec import ModelSpec
from emscale.results import ResultsStore
from emscale.stages.anomaly import AnomalyScorer, write_anomaly_stage
from emscale.stages.cluster import PhaseClustering, phase_stage, write_phase_stage
from emscale.stages.encode import (
    PCAProjection,
    encode_stage,
    error_metric,
    write_encode_stage,
)
from emscale.stages.pca import PCA, write_pca_stage
from emscale.stages.preprocess import Preprocessor, write_preprocess_stage
from emscale.stages.train import TrainConfig, write_train_stage
from emscale.store import feature_matrix
from emscale.synth.eels import synth_eels
from emscale.trainer import train_autoencoder

SHAPE, CHANNELS, LATENT = (64, 64), 256, 4
CHAIN = [{"step": "normalize", "method": "sum"}]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("phases")
    with dask.config.set(scheduler="threads"):
        ref = ResultsStore(tmp / "reference.zarr").create()
        ref_features = write_preprocess_stage(
            ref, synth_eels(SHAPE, channels=CHANNELS, seed=11).chunk({"y": 16}), Preprocessor(CHAIN))
        res = ResultsStore(tmp / "scan.zarr").create()
        features = write_preprocess_stage(
            res, synth_eels(SHAPE, channels=CHANNELS, anomaly=True, seed=3).chunk({"y": 16}),
            Preprocessor(CHAIN))
        pca = write_pca_stage(res, features, PCA(8), error_k=LATENT)
        torch.manual_seed(0)
        result = train_autoencoder(ref.path / "preprocess",
                                   TrainConfig(latent_dim=LATENT, epochs=25, batch_size=128, tile=8,
                                               threads=2))
        spec = ModelSpec.from_train_stage(write_train_stage(ref, result), (CHANNELS,))
        proj = PCAProjection.from_pca_stage(pca, LATENT)
        ref_encoded = write_encode_stage(ref, ref_features, spec)
        encoded = write_encode_stage(res, features, spec, pca=proj, denoised=True)
    return dict(ref=ref, ref_features=ref_features, ref_encoded=ref_encoded, res=res,
                features=features, pca=pca, spec=spec, proj=proj, encoded=encoded)


# --------------------------------------------------------------------------------------------
# encoding


def _in_memory_encode(spec, x, intensity):
    z, rec = _torch_reference(spec, x)
    s = intensity[:, None]
    chi2 = ((rec - x) ** 2 * s**2 / np.maximum(rec * s, 1)).mean(1)
    return z, chi2, rec


def test_encode_blockwise_equals_in_memory(pipeline):
    f, e = pipeline["features"], pipeline["encoded"]
    x = f["features"].values.reshape(-1, CHANNELS)
    z, chi2, rec = _in_memory_encode(pipeline["spec"], x, f["intensity"].values.ravel())
    np.testing.assert_allclose(e["latent"].values.reshape(-1, LATENT), z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(e["recon_error"].values.ravel(), chi2, rtol=1e-3)
    np.testing.assert_allclose(e["denoised"].values.reshape(-1, CHANNELS), rec, rtol=1e-4, atol=1e-8)
    assert e.attrs["encode"]["error"] == "poisson"


def test_a_wide_conv_model_is_encoded_in_passes_within_the_activation_budget():
    """A conv model's intermediate outputs per row (about 4.6 MB at 256 channels on 64 x 64
    patterns) set the rows per forward pass: 2048 rows of it had taken a worker past 6 GiB. The
    codes and errors are the whole block's."""
    from emscale.models import build_model
    from emscale.stages import encode as enc

    torch.manual_seed(0)
    model = build_model("conv", (64, 64), 4, (256, 64)).eval()
    layout, flat, offset = [], [], 0
    for name, tensor in model.state_dict().items():
        layout.append({"name": name, "shape": list(tensor.shape), "offset": offset})
        flat.append(tensor.numpy().ravel())
        offset += tensor.numel()
    spec = ModelSpec(config={"model": "conv", "latent_dim": 4, "widths": [256, 64]},
                     signal_shape=(64, 64), weights=np.concatenate(flat).astype(np.float32),
                     layout=tuple(layout), mean=np.zeros(64 * 64, np.float32), scale=1.0)
    step = enc._torch_model(spec)[2]
    assert 16 <= step <= 64, step
    x = np.random.default_rng(0).random((6, 20, 64, 64), dtype=np.float32)
    ones = np.ones((6, 20), np.float32)
    latent, err = enc.encode_block(x, ones.astype(bool), ones, spec)
    with torch.no_grad():
        z = model.encode(torch.from_numpy(x.reshape(120, -1)))
        rec = model.decode(z).numpy()
    np.testing.assert_allclose(latent.reshape(120, 4), z.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(err.ravel(), ((rec - x.reshape(120, -1)) ** 2).mean(1), rtol=1e-4)


def test_pca_error_at_the_same_k_equals_numpy(pipeline):
    f, p = pipeline["features"], pipeline["pca"]
    x = f["features"].values.reshape(-1, CHANNELS).astype(np.float64)
    mean = p["pca_mean"].values
    comps = p["pca_components"].values[:LATENT]
    rec = (x - mean) @ comps.T @ comps + mean
    s = f["intensity"].values.reshape(-1, 1)
    chi2 = ((rec - x) ** 2 * s**2 / np.maximum(rec * s, 1)).mean(1)
    np.testing.assert_allclose(pipeline["encoded"]["pca_recon_error"].values.ravel(), chi2, rtol=2e-3)


def test_chi_square_error_is_about_one_on_normal_pixels(pipeline):
    """The Poisson-aware error is noise-calibrated: ~1 per feature where the model fits, higher
    on the anomalies it never saw."""
    e, label = pipeline["encoded"], pipeline["features"]["label"].values
    normal = np.nanmedian(e["recon_error"].values[label >= 0])
    anomalous = np.nanmedian(e["recon_error"].values[label < 0])
    assert 0.8 < normal < 1.6
    assert anomalous > 1.3 * normal


def test_encode_on_a_cluster_builds_the_model_once_per_worker(pipeline, local_client):
    from emscale import model_spec as train

    f = pipeline["features"]
    local_client.run(lambda: train._MODEL_CACHE.clear() or train.MODEL_BUILDS.__setitem__(0, 0))
    ds = encode_stage(f, pipeline["spec"], pca=pipeline["proj"])
    assert ds["latent"].data.numblocks[0] == 4  # more tasks than workers
    latent, err = dask.compute(ds["latent"].data, ds["recon_error"].data)
    builds = local_client.run(lambda: train.MODEL_BUILDS[0])
    assert all(n <= 1 for n in builds.values()) and sum(builds.values()) >= 1
    np.testing.assert_allclose(latent, pipeline["encoded"]["latent"].values, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(err, pipeline["encoded"]["recon_error"].values, rtol=1e-4)


def test_encode_reconstructs_pca_from_the_pca_stage_scores(pipeline):
    # the run's encode stage reads the PCA stage's scores (stored, merged map blocks) instead of
    # projecting every pixel again: the same comparison error as projecting
    f, pca = pipeline["features"], pipeline["pca"]
    scored = encode_stage(f, pipeline["spec"], pca=pipeline["proj"], pca_scores=pca["pca_scores"])
    assert any(name.startswith("read-pca_scores") or "pca_scores" in name
               for name in scored["pca_recon_error"].data.dask.layers)
    with dask.config.set(scheduler="threads"):
        got = scored["pca_recon_error"].values
    want = pipeline["encoded"]["pca_recon_error"].values
    assert np.isfinite(want).sum() > 0.9 * want.size
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    assert np.array_equal(np.isnan(got), np.isnan(want))


def test_encode_rejects_bad_settings(pipeline):
    f = pipeline["features"]
    with pytest.raises(ConfigError, match="encode.error"):
        error_metric(f, "huber")
    other = f.copy()
    other.attrs = {**f.attrs, "preprocess": {"steps": [{"step": "anscombe"}]}}
    with pytest.raises(ConfigError, match="encode.error: 'poisson' needs"):
        error_metric(other, "poisson")
    assert error_metric(other, "auto") == "mse"
    with pytest.raises(ConfigError, match="trained on signals of shape"):
        encode_stage(f.isel(energy=slice(0, 100)), pipeline["spec"])
    with pytest.raises(ConfigError, match="cannot compare at k=9"):
        PCAProjection.from_pca_stage(pipeline["pca"], 9)


# --------------------------------------------------------------------------------------------
# anomalies


def test_anomalies_found_with_robust_calibration(pipeline):
    """No pixel declared normal: the threshold comes from the scan itself (median/MAD)."""
    label = pipeline["features"]["label"].values
    scorer = AnomalyScorer(calibration="robust", false_alarm_rate=0.01).fit(pipeline["encoded"])
    flagged = scorer.score(pipeline["encoded"])["anomaly"].values
    recall, false_alarms = flagged[label < 0].mean(), flagged[label >= 0].mean()
    # measured 0.87 and 0.002 here: the contamination is all found, the beam damage (a narrow O2
    # peak blurred at 256 channels) mostly
    assert recall >= 0.8, recall
    assert false_alarms <= 0.02, false_alarms


def test_reference_calibration_on_a_normal_scan_and_another_scan(pipeline):
    """Fit on the reference scan (declared normal): about 1 % of it is flagged at the 99th
    percentile, and the anomalies of the other scan are found."""
    scorer = AnomalyScorer(calibration="reference", quantile=0.99).fit(pipeline["ref_encoded"])
    on_ref = scorer.score(pipeline["ref_encoded"])["anomaly"].values
    assert 0.005 <= on_ref.mean() <= 0.015
    scored = scorer.score(pipeline["encoded"])
    label = pipeline["features"]["label"].values
    assert scored["anomaly"].values[label < 0].mean() >= 0.93  # measured 0.986
    assert scored["anomaly"].attrs["threshold"] == scorer.threshold_
    assert scored["anomaly"].attrs["method"] == "combined"


def test_a_declared_normal_region(pipeline, tmp_path):
    """A region of the scan itself declared normal; the stage is written atomically."""
    e = pipeline["encoded"]
    label = pipeline["features"]["label"].values
    region = np.zeros(label.shape, bool)
    region[:, :32] = True
    region &= label >= 0  # the user's clean region holds no anomaly
    scorer = AnomalyScorer(calibration="reference", false_alarm_rate=0.01).fit(e, normal=region)
    assert scorer.n_normal_ == region.sum()
    results = ResultsStore(tmp_path / "r.zarr").create()
    with dask.config.set(scheduler="threads"):
        written = write_anomaly_stage(results, e, scorer)
    flagged = written["anomaly"].values
    assert flagged.dtype == bool and flagged[label < 0].mean() >= 0.9
    assert np.isfinite(written["mahalanobis"].values).all()


def test_mahalanobis_equals_numpy(pipeline):
    e = pipeline["encoded"]
    scorer = AnomalyScorer(density="gaussian").fit(e)
    z = e["latent"].values.reshape(-1, LATENT).astype(np.float64)
    cov = np.cov(z.T)
    np.testing.assert_allclose(scorer.latent_covariance_, cov, rtol=1e-6)
    d = z - z.mean(0)
    ref = np.sqrt(np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d))
    np.testing.assert_allclose(scorer.score(e)["mahalanobis"].values.ravel(), ref, rtol=1e-3)


def _encoded_codes(z: np.ndarray, side: int) -> xr.Dataset:
    rng = np.random.default_rng(1)
    err = np.exp(rng.normal(0, 0.1, len(z))).astype(np.float32)
    return xr.Dataset({"latent": (("y", "x", "latent_dim"),
                                  da.from_array(z.reshape(side, side, -1).astype(np.float32),
                                                chunks=(16, side, -1))),
                       "recon_error": (("y", "x"), da.from_array(err.reshape(side, side),
                                                                 chunks=(16, side)))},
                      attrs={"encode": {"latent_dim": z.shape[1]}})


def test_the_mixture_density_keeps_the_false_alarm_rate_on_several_phases():
    """Codes of two phases (80 % and 17 % of the pixels, far apart) and a rare population (3 %)
    between them: one Gaussian around all of them is wide enough to take in half of the rare
    population (measured 0.455 flagged); the mixture's distance is to the phase a code belongs
    to, and the rare population, a component under the minor share, is far from every normal
    one."""
    rng = np.random.default_rng(0)
    side, d = 64, 4
    n = side * side
    kind = rng.choice(3, n, p=[0.80, 0.17, 0.03])
    centres = np.array([[0, 0, 0, 0], [12, 0, 0, 0], [5, 9, 0, 0]], float)
    z = centres[kind] + rng.normal(0, 1, (n, d))
    e = _encoded_codes(z, side)
    with dask.config.set(scheduler="threads"):
        one = AnomalyScorer(method="mahalanobis", density="gaussian").fit(e)
        mix = AnomalyScorer(method="mahalanobis", density="mixture").fit(e)
        one_flags = one.score(e)["anomaly"].values.ravel()
        scored = mix.score(e)
    flags = scored["anomaly"].values.ravel()
    assert one_flags[kind == 2].mean() < 0.7
    assert flags[kind < 2].mean() <= 0.02 and flags[kind == 1].mean() <= 0.03
    assert flags[kind == 2].mean() >= 0.95
    summary = scored.attrs["anomaly"]
    assert summary["density"] == "mixture" and sum(summary["mixture_weights"]) == pytest.approx(1)
    # the distance is the Mahalanobis distance to the most likely major component
    gm = mix.mixture_
    i = 17
    q = z[i] - gm["means"]
    d2 = np.einsum("ki,kij,kj->k", q, gm["precisions"], q)
    major = np.array(gm["major"])
    np.testing.assert_allclose(gm["log_prior"], np.log(np.array(gm["weights"])[major])
                               + 0.5 * np.linalg.slogdet(gm["precisions"])[1])
    logp = gm["log_prior"] - 0.5 * d2
    assert scored["mahalanobis"].values.ravel()[i] == pytest.approx(np.sqrt(d2[logp.argmax()]),
                                                                     rel=1e-4)


def test_anomaly_settings_rejected(pipeline):
    e = pipeline["encoded"]
    with pytest.raises(ConfigError, match="anomaly.method"):
        AnomalyScorer(method="isolation").fit(e)
    with pytest.raises(ConfigError, match="anomaly.quantile"):
        AnomalyScorer(quantile=1.5).fit(e)
    with pytest.raises(ConfigError, match="anomaly.false_alarm_rate"):
        AnomalyScorer(false_alarm_rate=0).fit(e)
    with pytest.raises(ConfigError, match="anomaly.normal"):
        AnomalyScorer().fit(e, normal=np.ones((3, 3), bool))
    with pytest.raises(ConfigError, match="call fit"):
        AnomalyScorer().score(e)


# --------------------------------------------------------------------------------------------
# clustering


def _blobs(n=3000, k=3, d=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, (k, d))
    lab = rng.integers(0, k, n)
    return (centres[lab] + rng.normal(0, 1, (n, d))).astype(np.float32), lab


@pytest.mark.parametrize("choice", ["silhouette", "bic", "elbow"])
def test_k_choice_finds_the_blobs(sync_scheduler, choice):
    x, lab = _blobs()
    method = "gmm" if choice == "bic" else "kmeans"
    c = PhaseClustering(method, k_choice=choice, k_range=(2, 7), n_init=3, seed=1).fit(
        da.from_array(x, chunks=(700, 4)))
    assert c.n_clusters_ == 3 and c.k_chosen_by_ == choice
    assert len(c.k_table_["silhouette"]) == 6
    pred = c.predict(da.from_array(x, chunks=(700, 4))).compute()
    assert adjusted_rand_score(lab, pred) > 0.99


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_codes_without_phase_structure_give_one_phase(sync_scheduler, method):
    """Issue 16: one Gaussian cloud (a uniform specimen's noise) is K = 1, said, not K = 2..8."""
    x = np.random.default_rng(3).normal(0, 1, (3000, 4)).astype(np.float32)
    c = PhaseClustering(method, k_range=(2, 6), n_init=2, seed=0).fit(da.from_array(x, chunks=(700, 4)))
    assert c.n_clusters_ == 1 and c.k_chosen_by_ == "no phase structure"
    assert not c.structure_["phase_structure"] and c.structure_["best_silhouette"] < 0.25
    assert c.warnings_[0].startswith("no phase structure: ")
    assert (c.predict(da.from_array(x, chunks=(700, 4))).compute() == 0).all()
    assert c.summary()["warnings"] == c.warnings_


def test_blobs_have_phase_structure_and_no_structure_warning(sync_scheduler):
    x, _ = _blobs()
    c = PhaseClustering(k_range=(2, 5), n_init=2, seed=0).fit(da.from_array(x, chunks=(700, 4)))
    assert c.structure_["phase_structure"] and c.structure_["best_silhouette"] > 0.5
    assert c.n_clusters_ == 3 and not any("phase structure" in w for w in c.warnings_)


def test_the_pca_scores_veto_does_not_depend_on_their_scale(sync_scheduler):
    """The PCA scores of unit-sum spectra vary by 1e-7..1e-5: phases there are phases (a fixed
    reg_covar of the mixtures once made them one Gaussian, and the scan K = 1); and one cloud
    stays one, whatever its scale."""
    x, _ = _blobs()
    blobs = da.from_array(x, chunks=(700, 4))
    c = PhaseClustering(k_range=(2, 5), n_init=2, seed=0).fit(blobs, pca_scores=blobs * 1e-4)
    assert c.structure_["pca_scores"]["phase_structure"] and c.n_clusters_ == 3
    cloud = da.from_array(np.random.default_rng(3).normal(0, 1e-4, (3000, 4)), chunks=(700, 4))
    c = PhaseClustering(k_range=(2, 5), n_init=2, seed=0).fit(blobs, pca_scores=cloud)
    assert c.n_clusters_ == 1 and not c.structure_["pca_scores"]["phase_structure"]


def test_k_at_the_top_of_k_range_and_a_minor_phase_are_warned(sync_scheduler):
    x, _ = _blobs(n=3000, k=5, seed=6)
    c = PhaseClustering(k_choice="silhouette", k_range=(2, 4), n_init=2, seed=0).fit(
        da.from_array(x, chunks=(700, 4)))
    assert c.n_clusters_ == 4
    assert any("is the top of k_range [2, 4]" in w for w in c.warnings_), c.warnings_
    # 20 of 3020 pixels far from the rest: their own phase, reported as minor
    rng = np.random.default_rng(1)
    y = np.concatenate([_blobs(n=3000, k=3, seed=7)[0], rng.normal(40, 0.5, (20, 4)).astype(np.float32)])
    c = PhaseClustering(n_clusters=4, n_init=2, seed=0).fit(da.from_array(y, chunks=(755, 4)))
    assert c.counts_[-1] == 20
    assert c.warnings_ == ["phase 3 holds 0.66% of the labelled pixels (under "
                           "cluster.min_phase_fraction 0.01): a minor phase or a cluster of "
                           "anomalies, see its mean signal"]


def test_ridgeline_ratio_knows_when_two_gaussians_make_one_bump():
    from emscale.mixture_modes import mode_groups, ridgeline_ratio

    one = np.eye(2)
    # equal unit Gaussians 1.5 apart (under 2 sd): one mode; 4 apart: a dip to 2 N(2) / N(0)
    assert ridgeline_ratio(0.5, np.zeros(2), one, 0.5, np.array([1.5, 0]), one) == 1.0
    deep = ridgeline_ratio(0.5, np.zeros(2), one, 0.5, np.array([4.0, 0]), one)
    assert deep == pytest.approx(2 * np.exp(-2) / (1 + np.exp(-8)), rel=1e-3)
    means = np.array([[0, 0], [1.5, 0], [9, 0]], float)
    assert list(mode_groups([0.4, 0.4, 0.2], means, np.stack([one] * 3))) == [0, 0, 1]


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_a_distinct_minor_population_is_not_merged_into_a_phase(sync_scheduler, method):
    """Issue 16: three big phases and a 2 % island beside one of them. The elbow counts the
    three; the island, a separate mode of the codes' density, becomes a phase of its own."""
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0, 0, 0], [12, 0, 0, 0], [0, 12, 0, 0]], float)
    lab = rng.integers(0, 3, 3000)
    x = np.vstack([centres[lab] + rng.normal(0, 1, (3000, 4)),
                   np.array([0, 0, 6, 0]) + rng.normal(0, 0.5, (60, 4))]).astype(np.float32)
    lab = np.concatenate([lab, np.full(60, 3)])
    xd = da.from_array(x, chunks=(800, 4))
    k_choice = "elbow" if method == "kmeans" else "silhouette"  # both of which count 3 here
    merged = PhaseClustering(method, k_choice=k_choice, k_range=(2, 6), n_init=2, seed=0,
                             islands=False).fit(xd)
    assert merged.n_clusters_ == 3
    c = PhaseClustering(method, k_choice=k_choice, k_range=(2, 6), n_init=2, seed=0).fit(xd)
    assert c.n_clusters_ == 4 and c.islands_ == 1
    pred = c.predict(xd).compute()
    assert (pred[-60:] == 3).all() and adjusted_rand_score(lab, pred) > 0.99
    assert any("a phase of its own" in w for w in c.warnings_)


def test_full_data_kmeans_matches_scikit_learn(sync_scheduler):
    x, _ = _blobs(n=4000, k=4, seed=2)
    c = PhaseClustering(n_clusters=4, sample_size=500, seed=0).fit(da.from_array(x, chunks=(999, 4)))
    ref = KMeans(4, n_init=10, random_state=0).fit(x.astype(np.float64))
    assert c.inertia_ == pytest.approx(ref.inertia_, rel=1e-6)
    got = np.sort(c.cluster_centers_, axis=0)
    np.testing.assert_allclose(got, np.sort(ref.cluster_centers_, axis=0), atol=1e-6)
    # numbered by decreasing size
    assert list(c.counts_) == sorted(c.counts_, reverse=True)


def test_gmm_probabilities_and_invalid_pixels(sync_scheduler):
    x, lab = _blobs(n=2000, k=3, seed=4)
    valid = np.ones(len(x), bool)
    valid[:10] = False
    xd, vd = da.from_array(x, chunks=(500, 4)), da.from_array(valid, chunks=500)
    c = PhaseClustering("gmm", n_clusters=3, seed=0).fit(xd, vd)
    proba = c.predict_proba(xd, vd).compute()
    pred = c.predict(xd, vd).compute()
    assert np.isnan(proba[:10]).all() and (pred[:10] == -1).all()
    np.testing.assert_allclose(proba[10:].sum(1), 1, rtol=1e-5)
    assert (proba[10:].argmax(1) == pred[10:]).all()
    assert adjusted_rand_score(lab[10:], pred[10:]) > 0.99


def test_em_statistics_match_their_definition():
    """One EM pass's sufficient statistics (computed by GEMMs) equal the textbook sums."""
    from sklearn.mixture import GaussianMixture

    from emscale.stages.cluster import _em_block

    x = _blobs(n=600, k=3, seed=5)[0].astype(np.float64)
    gm = GaussianMixture(3, covariance_type="full", random_state=0).fit(x)
    stats = _em_block(x, None, gmm=gm)
    r = gm.predict_proba(x)
    np.testing.assert_allclose(stats["nk"], r.sum(0), rtol=1e-10)
    np.testing.assert_allclose(stats["sx"], r.T @ x, rtol=1e-10)
    np.testing.assert_allclose(stats["sxx"], np.einsum("nk,ni,nj->kij", r, x, x), rtol=1e-10)
    np.testing.assert_allclose(stats["loglik"], gm.score(x) * len(x), rtol=1e-10)


def test_phase_stage_on_the_synthetic_scan(pipeline):
    """Latent k-means at the true K against the ground truth, PCA alongside; the phase mean
    signal is the exact mean of the features of each phase."""
    f, e = pipeline["features"], pipeline["encoded"]
    label = f["label"].values
    anomaly = AnomalyScorer(calibration="robust").fit(e).score(e)["anomaly"]
    with dask.config.set(scheduler="threads"):
        ds = write_phase_stage(pipeline["res"], e, f, PhaseClustering(n_clusters=4, seed=0),
                               spec=pipeline["spec"], pca=pipeline["pca"], exclude=anomaly)
    normal = label >= 0
    ari = adjusted_rand_score(label[normal], ds["phase"].values[normal])
    assert ari >= 0.6, ari
    assert "pca_phase" in ds and ds["pca_phase"].shape == label.shape
    x = f["features"].values.reshape(-1, CHANNELS)
    phase = ds["phase"].values.ravel()
    for c in range(4):
        np.testing.assert_allclose(ds["phase_mean_signal"].values[c], x[phase == c].mean(0),
                                   rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(ds["phase_fraction"].values.sum(), 1)
    # numbered by decreasing size, counted in the phase means' pass: the labelled pixels
    for p in ("", "pca_"):
        labels = ds[f"{p}phase"].values.ravel()
        counts = np.bincount(labels[labels >= 0], minlength=4)
        assert ds.attrs[f"{p}phase"]["counts"] == list(counts) == sorted(counts, reverse=True)
        np.testing.assert_allclose(ds[f"{p}phase_fraction"].values, counts / counts.sum())
    # the flagged pixels' mean signal, from the same pass (issue 16: the report shows it)
    flagged = anomaly.values.ravel()
    assert ds["anomaly_mean_signal"].attrs["pixels"] == flagged.sum() > 0
    np.testing.assert_allclose(ds["anomaly_mean_signal"].values, x[flagged].mean(0),
                               rtol=1e-4, atol=1e-9)
    assert ds["phase_centroid_signal"].shape == (4, CHANNELS)
    assert set(ds.data_vars) >= {"phase", "phase_fraction", "phase_mean_signal", "phase_centroid"}


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_the_labels_are_predicted_once_and_kept_for_the_write(pipeline, tmp_path, method):
    """The phase-means pass keeps the labels it predicts (GMM: the probabilities); the written
    labels read them back, renumbered by size: the same maps as predicting them again."""
    from emscale.stages.cluster import phase_dataset

    f, e = pipeline["features"], pipeline["encoded"]
    with dask.config.set(scheduler="threads"):
        again = phase_dataset(e, f, PhaseClustering(method, n_clusters=3, seed=0),
                              pca=pipeline["pca"])
        kept = phase_dataset(e, f, PhaseClustering(method, n_clusters=3, seed=0),
                             pca=pipeline["pca"], keep=tmp_path / "labels")
        names = [v for v in kept.data_vars if kept[v].dims[:2] == ("y", "x")]
        for name in names:
            layers = list(kept[name].data.dask.layers)
            assert not any("phase-predict" in n or "phase-proba" in n for n in layers), name
        assert len(list((tmp_path / "labels" / "latent").glob("*.npy"))) == \
            feature_matrix(e["latent"]).numblocks[0]
        for name in names:
            np.testing.assert_array_equal(kept[name].values, again[name].values, err_msg=name)
    labels = kept["phase"].values.ravel()
    counts = np.bincount(labels[labels >= 0])
    assert list(counts) == sorted(counts, reverse=True) == kept.attrs["phase"]["counts"]


def test_phase_stage_auto_k_reports_the_three_curves(pipeline):
    f, e = pipeline["features"], pipeline["encoded"]
    with dask.config.set(scheduler="threads"):
        ds = phase_stage(e["latent"], f, PhaseClustering("gmm", k_range=(2, 5), n_init=2, seed=0))
    assert list(ds["k_candidate"].values) == [2, 3, 4, 5]
    for name in ("k_inertia", "k_silhouette", "k_bic"):
        assert np.isfinite(ds[name].values).all()
    k = ds.attrs["phase"]["n_clusters"]
    assert ds["phase_probability"].shape == (*SHAPE, k)
    assert ds.attrs["phase"]["chosen_by"] == "bic"


def test_clustering_settings_rejected():
    x = da.zeros((10, 2), chunks=5)
    for kwargs, field in [({"method": "dbscan"}, "method"), ({"k_range": (1, 4)}, "k_range"),
                          ({"k_choice": "gap"}, "k_choice"), ({"n_clusters": 0}, "n_clusters"),
                          ({"n_init": 0}, "n_init"), ({"tol": -1}, "tol")]:
        with pytest.raises(ConfigError, match=f"cluster.{field}"):
            PhaseClustering(**kwargs).fit(x)


def test_4dstem_through_encode_anomaly_and_phases(tmp_path):
    """Diffraction patterns alike: a conv autoencoder encoded blockwise, scored, clustered; the
    outputs keep the pattern dims."""
    from emscale.store import ChunkPolicy
    from emscale.synth.diffraction import synth_diffraction

    scan = synth_diffraction((16, 16), pattern=(64, 64), anomaly=True, seed=2,
                             policy=ChunkPolicy(target_mib=0.5))
    results = ResultsStore(tmp_path / "r.zarr").create()
    with dask.config.set(scheduler="threads"):
        f = write_preprocess_stage(results, scan, Preprocessor([{"step": "bin", "factor": 2},
                                                                {"step": "scale", "method": "sqrt"}]))
        config = TrainConfig(model="conv", latent_dim=3, widths=(8, 16), epochs=2, batch_size=32,
                             tile=4, threads=2)
        spec = ModelSpec.from_train_stage(
            write_train_stage(results, train_autoencoder(results.path / "preprocess", config)),
            (32, 32))
        pca = write_pca_stage(results, f, PCA(4), error_k=3)
        e = write_encode_stage(results, f, spec, pca=PCAProjection.from_pca_stage(pca, 3),
                               denoised=True)
        assert e.attrs["encode"]["error"] == "mse"  # sqrt-scaled patterns are not counts
        assert e["denoised"].dims == ("y", "x", "ky", "kx") and e["latent"].shape == (16, 16, 3)
        x = f["features"].values.reshape(-1, 32 * 32)
        z, rec = _torch_reference(spec, x)
        np.testing.assert_allclose(e["latent"].values.reshape(-1, 3), z, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(e["recon_error"].values.ravel(), ((rec - x) ** 2).mean(1),
                                   rtol=1e-4)
        anomaly = AnomalyScorer(calibration="robust").fit(e).score(e)
        ds = write_phase_stage(results, e, f, PhaseClustering(n_clusters=3, seed=0), spec=spec,
                               pca=pca, exclude=anomaly["anomaly"])
    assert ds["phase_mean_signal"].dims == ("cluster", "ky", "kx")
    assert ds["phase_centroid_signal"].shape == (3, 32, 32)
    assert set(np.unique(ds["phase"].values)) <= {0, 1, 2}


def _torch_reference(spec, x):
    model = spec.build()
    with torch.no_grad():
        z = model.encode((torch.from_numpy(x) - torch.from_numpy(spec.mean)) / spec.scale)
        rec = model.decode(z) * spec.scale + torch.from_numpy(spec.mean)
    return z.numpy(), rec.numpy()


def test_phase_means_read_each_feature_block_once_for_every_clustering(pipeline):
    """Several clusterings' phase means share one pass over the features, and each features
    block has a single task reading it: two reductions sharing the blocks kept all of them in
    memory until both had read them (54 GB spilled on a 100 GB scan)."""
    import dask.array as da
    from dask.core import get_dependencies

    from emscale.stages.cluster import lazy_phase_means, phase_means
    from emscale.store import feature_matrix

    f = pipeline["features"]
    feats = feature_matrix(f["features"])
    labels = da.zeros(feats.shape[0], dtype=np.int32, chunks=(feats.chunks[0],))
    stats = phase_means(f, [(labels, 2), (labels + 1, 3)])
    assert [s["sums"].shape[0] for s in stats] == [2, 3]
    assert stats[0]["counts"][0] == stats[1]["counts"][1] == feats.shape[0]
    graph = dict(lazy_phase_means(f, [(labels, 2), (labels, 3)]).__dask_graph__())
    users = {}
    for key in graph:
        for dep in get_dependencies(graph, key):
            users.setdefault(dep, set()).add(key)
    blocks = [k for k in graph if isinstance(k, tuple) and k[0] == feats.name]
    assert len(blocks) == feats.numblocks[0]
    assert all(len(users[k]) == 1 for k in blocks)


def test_class_recall_counts_flagged_own_phase_and_either():
    from emscale.evaluate import class_recall

    # classes: two phases (0, 1) and one anomaly kind (2); found phases 0, 1; class 2 sits
    # inside found phase 1 (merged), half of it flagged
    classes = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    phase = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    flagged = np.array([0, 0, 0, 0, 0, 1, 1, 0], bool)
    out = class_recall(classes, ["a", "b", "odd"], 2, phase, flagged)
    assert out["classes"]["a"] == {"pixels": 3, "anomaly": False, "flagged": 0.0,
                                   "own_phase": pytest.approx(2 / 3), "either": pytest.approx(2 / 3)}
    assert out["classes"]["odd"]["own_phase"] == 0 and out["classes"]["odd"]["either"] == 0.5
    assert out["false_alarm_rate"] == pytest.approx(1 / 6) and out["worst_either"] == 0.5


def test_small_distinct_populations_do_not_take_the_phases_the_big_ones_need():
    """Latent codes of the 512 x 512 bench scan (seed 3) trained on itself, no reference, the
    unflagged pixels (4000 sampled; tests/data): contamination and beam damage (2 % and 3 %) are
    learnt, so each is a small cluster of its own. With them in the K sweep the elbow said 5 and
    Fe3O4 went into FeO; split out first (``island_share``), K = 4 is chosen on the rest."""
    from pathlib import Path

    from sklearn.metrics import adjusted_rand_score

    from emscale.evaluate import class_recall

    data = np.load(Path(__file__).parent / "data" / "eels-seed3-latent-codes.npz")
    codes, label = data["codes"], data["label"].astype(int)
    names = ["Fe2O3", "FeO", "Fe3O4", "surface", "F contamination", "beam damage"]
    x = da.from_array(codes, chunks=(1000, -1))
    found = {}
    with dask.config.set(scheduler="synchronous"):
        for share in (0.0, 0.05):
            pc = PhaseClustering("kmeans", island_share=share, seed=0).fit(x)
            phase = np.asarray(pc.predict(x).compute())
            found[share] = (pc, class_recall(label, names, 4, phase, np.zeros(len(label), bool)),
                            adjusted_rand_score(label, phase))
    before, after = found[0.0], found[0.05]
    assert before[0].n_clusters_ == 5 and before[1]["classes"]["Fe3O4"]["own_phase"] < 0.1
    assert after[0].n_clusters_ == 6 and after[0].islands_ == 2 and after[0].k_chosen_by_ == "elbow"
    assert after[1]["worst_either"] > 0.85 and after[2] > 0.85 > before[2] + 0.2, (after, before)
    assert sum("minor population" in w for w in after[0].warnings_) == 2
