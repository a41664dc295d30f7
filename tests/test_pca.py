import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA as SkPCA

from emscale.errors import ConfigError
from emscale.stages.pca import PCA, pca_stage, scree_elbow


def low_rank_data(n=3000, f=64, rank=5, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n, rank)) * np.linspace(10, 2, rank)
    basis = np.linalg.qr(rng.normal(size=(f, rank)))[0].T
    return (100.0 + scores @ basis + rng.normal(scale=0.3, size=(n, f))).astype(np.float32)


UNEVEN = ((700, 1, 999, 300, 1000),)  # includes a one-pixel chunk

# Stated tolerances against scikit-learn's exact PCA (float64, full SVD) on the same data:
# (max principal angle in rad, relative error of explained variance / ratio)
TOLERANCE = {"gram": (1e-5, 1e-4), "randomized": (1e-3, 1e-3), "incremental": (1e-3, 1e-3)}


def check_parity(x, ours, k, solver):
    ref = SkPCA(n_components=k, svd_solver="full").fit(x.astype(np.float64))
    max_angle, rtol = TOLERANCE[solver]
    np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=rtol)
    np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=rtol)
    np.testing.assert_allclose(ours.mean_, ref.mean_, rtol=1e-6)
    angle = subspace_angles(ours.components_.T.astype(np.float64), ref.components_.T).max()
    assert angle < max_angle, (solver, angle)
    return ref


@pytest.mark.parametrize("solver", ["gram", "randomized", "incremental"])
def test_solver_matches_sklearn_on_uneven_chunks(solver, sync_scheduler):
    x = low_rank_data()
    dx = da.from_array(x, chunks=UNEVEN + ((64,),))
    check_parity(x, PCA(n_components=5, solver=solver).fit(dx), 5, solver)


@pytest.mark.parametrize("solver", ["gram", "randomized", "incremental"])
def test_solver_on_local_cluster(solver, local_client):
    x = low_rank_data(seed=1)
    dx = da.from_array(x, chunks=UNEVEN + ((64,),))
    pca = PCA(n_components=5, solver=solver).fit(dx)
    ref = check_parity(x, pca, 5, solver)
    scores = pca.transform(dx).compute()
    ref_scores = ref.transform(x.astype(np.float64))
    # same subspace: scores agree up to the sign of each component
    signs = np.sign((scores * ref_scores).sum(0))
    np.testing.assert_allclose(scores * signs, ref_scores, atol=1e-2 * np.abs(ref_scores).max())


@pytest.mark.parametrize("solver", ["gram", "randomized", "incremental"])
def test_invalid_pixels_are_skipped(solver, sync_scheduler):
    x = low_rank_data(seed=2)
    valid = np.ones(len(x), bool)
    valid[::7] = False
    garbage = x.copy()
    garbage[~valid] = 1e4  # would dominate the first component if it were used
    dx = da.from_array(garbage, chunks=UNEVEN + ((64,),))
    pca = PCA(n_components=5, solver=solver).fit(dx, da.from_array(valid, chunks=UNEVEN))
    check_parity(x[valid], pca, 5, solver)
    assert pca.n_samples_ == valid.sum()


def test_wide_scatter_matrices_are_grouped_and_merged_few_at_a_time(monkeypatch, sync_scheduler):
    """Many features beside a block's rows (4D-STEM: 4096 features, 1024 patterns a block): a
    first-level task sums several blocks and merges hold few matrices; still exact."""
    from dask.core import get_dependencies

    from emscale.stages import pca as pca_module

    x = low_rank_data(n=1000, f=64, seed=4)
    valid = np.ones(len(x), bool)
    valid[::11] = False
    dx = da.from_array(x, chunks=((40,) * 25, (64,)))  # a 64 x 64 float64 matrix: 3.2 blocks
    dv = da.from_array(valid, chunks=((40,) * 25,))
    monkeypatch.setattr(pca_module, "MERGE_BYTES", 3 * 64 * 64 * 8)
    graph = dict(pca_module.scatter_statistics(dx, dv).__dask_graph__())
    first = [k for k in graph if isinstance(k, tuple) and "-block-" in k[0]]
    merges = [k for k in graph if isinstance(k, tuple) and "-merge-" in k[0]]
    assert len(first) == 25 // 4 + 1  # groups of ceil(32768 / 10240) = 4 blocks
    fan_in = [len(get_dependencies(graph, k)) for k in merges]
    assert max(fan_in) == 3 and sum(fan_in) == len(first) + len(merges) - 1
    check_parity(x[valid], PCA(n_components=5).fit(dx, dv), 5, "gram")


def test_gram_partial_fit_is_exact():
    x = low_rank_data(seed=3)
    pca = PCA(n_components=5)
    for start in range(0, len(x), 700):
        pca.partial_fit(x[start:start + 700])
    check_parity(x, pca, 5, "gram")


def test_scree_elbow_finds_the_rank(sync_scheduler):
    for rank in (2, 5, 9):
        x = low_rank_data(rank=rank, seed=rank)
        pca = PCA(n_components=20).fit(da.from_array(x, chunks=(1000, 64)))
        assert pca.suggested_k_ == rank
    assert scree_elbow(np.array([0.5, 0.5])) == 2


def test_score_and_error_match_numpy(sync_scheduler):
    x = low_rank_data(seed=4)
    pca = PCA(n_components=8).fit(da.from_array(x, chunks=(512, 64)))
    scores, err = pca.score_and_error(da.from_array(x, chunks=(512, 64)), k=3)
    c = x.astype(np.float64) - pca.mean_
    recon = (c @ pca.components_[:3].T) @ pca.components_[:3]
    np.testing.assert_allclose(err.compute(), ((c - recon) ** 2).mean(1), rtol=1e-3)
    np.testing.assert_allclose(scores.compute(), c @ pca.components_.T, rtol=1e-3, atol=1e-3)


def test_pca_stage_outputs_have_design_names(sync_scheduler):
    x = low_rank_data(n=30 * 20, f=16, rank=3, seed=5).reshape(30, 20, 16)
    feats = xr.Dataset({"features": (("y", "x", "energy"), da.from_array(x, chunks=(7, 20, 16))),
                        "valid": (("y", "x"), da.ones((30, 20), bool, chunks=(7, 20)))},
                       coords={"energy": np.arange(16.0)})
    out = pca_stage(feats, PCA(n_components=6))
    assert out.pca_components.dims == ("component", "energy") and out.pca_components.shape == (6, 16)
    assert out.pca_scores.dims == ("y", "x", "component") and out.pca_scores.shape == (30, 20, 6)
    assert out.pca_recon_error.dims == ("y", "x")
    assert out.pca_explained_variance_ratio.dims == ("component",)
    assert out.attrs["pca"]["suggested_k"] == 3 and out.attrs["pca"]["error_k"] == 3
    flat_err = out.pca_recon_error.values.ravel()
    assert flat_err.max() < 0.3  # the noise floor (0.3 sd per feature => ~0.09 mean square)


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_components=0), "n_components"), (dict(n_components=65), "n_components"),
    (dict(solver="magic"), "solver"), (dict(n_power_iter=-1), "n_power_iter"),
    (dict(batch_rows=2, n_components=4), "batch_rows"),
])
def test_bad_settings(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        PCA(**kwargs).fit(da.zeros((10, 64), chunks=(5, 64)))


def test_pca_stage_on_patterns(sync_scheduler):
    x = low_rank_data(n=12 * 10, f=64, rank=4, seed=6).reshape(12, 10, 8, 8)
    feats = xr.Dataset({"features": (("y", "x", "ky", "kx"), da.from_array(x, chunks=(5, 4, 8, 8)))})
    out = pca_stage(feats, PCA(n_components=5), error_k=4)
    assert out.pca_components.dims == ("component", "ky", "kx")
    ref = SkPCA(n_components=5, svd_solver="full").fit(x.reshape(-1, 64).astype(np.float64))
    scores = out.pca_scores.values.reshape(-1, 5)
    ref_scores = ref.transform(x.reshape(-1, 64).astype(np.float64))
    np.testing.assert_allclose(np.abs(scores), np.abs(ref_scores), rtol=1e-3, atol=1e-3)


def test_preprocess_then_pca_stages_on_local_cluster(local_client, tmp_path):
    """The two stages end to end on a real cluster: written, read back, and equal to scikit-learn
    on the same preprocessed features in memory."""
    from emscale.results import ResultsStore
    from emscale.stages.pca import write_pca_stage
    from emscale.stages.preprocess import Preprocessor, write_preprocess_stage
    from emscale.store import ChunkPolicy
    from emscale.synth.eels import synth_eels

    scan = synth_eels((20, 18), channels=128, anomaly=True, seed=4, policy=ChunkPolicy(target_mib=0.03))
    results = ResultsStore(tmp_path / "results.zarr")
    chain = Preprocessor([{"step": "crop", "start": 500, "stop": 780}, {"step": "anscombe"}])
    features = write_preprocess_stage(results, scan, chain)
    out = write_pca_stage(results, features, PCA(n_components=6))
    assert results.stages() == ["pca", "preprocess"]
    assert out.pca_scores.shape == (20, 18, 6) and out.pca_components.dims == ("component", "energy")
    x = features.features.values.reshape(20 * 18, -1).astype(np.float64)
    ref = SkPCA(n_components=6, svd_solver="full").fit(x)
    np.testing.assert_allclose(out.pca_explained_variance_ratio.values, ref.explained_variance_ratio_,
                               rtol=1e-4)
    k = out.attrs["pca"]["error_k"]
    c = x - ref.mean_
    recon = c @ ref.components_[:k].T @ ref.components_[:k]
    np.testing.assert_allclose(out.pca_recon_error.values.ravel(), ((c - recon) ** 2).mean(1),
                               rtol=1e-3, atol=1e-6)


def test_review_edge_cases(sync_scheduler):
    x = low_rank_data(n=1000, f=16, rank=3, seed=7)
    PCA(n_components=3).fit(x)  # numpy input of any length
    small = x[:5, :10]
    ours = PCA(n_components=2).fit(small)
    ref = SkPCA(n_components=2, svd_solver="full").fit(small.astype(np.float64))
    assert ours.noise_variance_ == pytest.approx(ref.noise_variance_, rel=1e-3)
    feats = xr.Dataset({"features": (("y", "x", "energy"), da.from_array(x.reshape(40, 25, 16), chunks=(9, 25, 16))),
                        "valid": (("y", "x"), da.from_array(np.arange(1000).reshape(40, 25) % 9 > 0, chunks=(9, 25)))})
    for bad in (0, -1, 7):
        with pytest.raises(ConfigError, match="error_k"):
            pca_stage(feats, PCA(n_components=6), error_k=bad)
    out = pca_stage(feats, PCA(n_components=6), error_k=3)
    invalid = ~feats.valid.values
    assert np.isnan(out.pca_recon_error.values[invalid]).all()
    assert np.isfinite(out.pca_scores.values[~invalid]).all()
    with pytest.raises(ConfigError, match="at least 2 valid pixels"):
        PCA(n_components=2, solver="incremental").fit(x, np.zeros(1000, bool))
