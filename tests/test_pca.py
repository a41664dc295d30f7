import dask.array as da
import numpy as np
import pytest
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA as SkPCA

from emscale.errors import ConfigError
from emscale.pca import PCA


def low_rank_data(n=3000, f=64, rank=5, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n, rank)) * np.linspace(10, 2, rank)
    basis = np.linalg.qr(rng.normal(size=(f, rank)))[0].T
    return (100.0 + scores @ basis + rng.normal(scale=0.3, size=(n, f))).astype(np.float32)


UNEVEN = ((700, 1, 999, 300, 1000),)  # includes a one-pixel chunk


def check_parity(x, ours, k):
    ref = SkPCA(n_components=k, svd_solver="full").fit(x.astype(np.float64))
    np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=1e-4)
    np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(ours.mean_, ref.mean_, rtol=1e-6)
    angle = subspace_angles(ours.components_.T.astype(np.float64), ref.components_.T).max()
    assert angle < 1e-4, angle


def test_gram_matches_sklearn_on_uneven_chunks(sync_scheduler):
    x = low_rank_data()
    dx = da.from_array(x, chunks=UNEVEN + ((64,),))
    check_parity(x, PCA(n_components=5).fit(dx), 5)


def test_gram_on_local_cluster(local_client):
    x = low_rank_data(seed=1)
    dx = da.from_array(x, chunks=UNEVEN + ((64,),))
    pca = PCA(n_components=5).fit(dx)
    check_parity(x, pca, 5)
    scores = pca.transform(dx).compute()
    ref = SkPCA(n_components=5, svd_solver="full").fit(x.astype(np.float64))
    ref_scores = ref.transform(x.astype(np.float64))
    # same subspace: scores agree up to the sign of each component
    signs = np.sign((scores * ref_scores).sum(0))
    np.testing.assert_allclose(scores * signs, ref_scores, atol=1e-2 * np.abs(ref_scores).max())


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_components=0), "n_components"), (dict(n_components=65), "n_components"),
    (dict(solver="magic"), "solver"),
])
def test_bad_settings(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        PCA(**kwargs).fit(da.zeros((10, 64), chunks=(5, 64)))
