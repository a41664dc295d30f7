import dask
import pytest


@pytest.fixture
def sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.fixture(scope="module")
def local_client():
    """A real distributed cluster: two worker processes, one thread each."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      memory_limit="2GiB") as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def small_eels_run(tmp_path_factory):
    """One small run of every stage, report included (12 x 10 EELS with anomalies, the denoised
    scan written), on dask's local scheduler: read, never written to, by the report's and the
    export's tests."""
    from emscale.runner import run_workflow
    from emscale.workflow import validate_workflow

    tmp = tmp_path_factory.mktemp("small-eels")
    wf = validate_workflow({
        "synth": {"kind": "eels", "shape": [12, 10], "channels": 96, "seed": 2, "anomaly": True},
        "train": {"latent_dim": 3, "widths": [32, 16], "epochs": 2, "tile": 4, "threads": 1,
                  "batch_size": 64},
        "pca": {"n_components": 4}, "encode": {"denoised": True},
        "cluster": {"k_range": [2, 3], "n_init": 1},
        "output": str(tmp / "out"), "chunk_mib": 0.05})
    return run_workflow(wf, echo=lambda *a: None)
