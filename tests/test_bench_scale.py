"""``emscale bench scale``: the shipped workflow end to end, figures per stage, memory bounded.

Timings are printed by the benchmark, never asserted; what is asserted is what a run must show:
every stage measured, the JSON the issue asks for, a plot, and peak memory that does not grow
with the scan (an 8x larger scan, the same chunks)."""

import json

from emscale.bench.scale import plot, run_scale_bench, write_json
from emscale.stages import REGISTRY

# the K sweep's sample and silhouette subset are capped (50 000 and 5 000 pixels by default): caps
# below both scans' pixel counts, so that the sweep's memory (on a worker) is the same for both
QUICK = {"train.epochs": 1, "cluster.k_range": [2, 3], "cluster.n_init": 1,
         "cluster.sample_size": 800, "cluster.silhouette_size": 400}


def test_scale_bench_measures_every_stage_and_memory_stays_bounded(tmp_path):
    runs = run_scale_bench([0.004, 0.032], ["eels"], tmp_path / "bench", overrides=QUICK,
                           chunk_mib=1.0, echo=lambda message: None)
    small, large = runs
    for run in runs:
        assert list(run.stages) == list(REGISTRY.names)
        assert run.floor_gb_per_s > 0 and run.disk_gb > 0
        for name, s in run.stages.items():
            assert s["seconds"] > 0 and s["tasks"] > 0, name
            assert s["peak_worker_mem_gb"] > 0.05 and s["peak_client_mem_gb"] > 0.05, name
            assert (s["limit_seconds"] is None) == (name == "train"), name
        # the features are not stored: the preprocess group holds maps only
        assert run.stages["preprocess"]["disk_gb"] < 0.1 * run.store_gb + 0.002
    # the stages that read the scan read all of it
    assert large.stages["pca"]["passes"] >= 1.5 and large.stages["encode"]["passes"] >= 0.9
    peak = {r.size_gb: max(s["peak_worker_mem_gb"] for s in r.stages.values()) for r in runs}
    assert peak[0.032] <= 1.2 * peak[0.004] + 0.05, peak
    # each run in its own process: the client's memory (the scheduler lives there) is its own
    client = {r.size_gb: max(s["peak_client_mem_gb"] for s in r.stages.values()) for r in runs}
    print("peak worker", peak, "peak client", client)
    assert client[0.032] <= 1.2 * client[0.004] + 0.1, client
    # training costs the same: it reads a gathered set of at most max_train_pixels pixels
    write_json(runs, tmp_path / "scale.json")
    data = json.loads((tmp_path / "scale.json").read_text())
    for run in data["runs"]:
        assert {"kind", "size_gb", "floor_gb_per_s", "end_to_end_ratio_to_floor",
                "end_to_end_ratio_to_limit", "disk_gb", "stages"} <= set(run)
        for s in run["stages"].values():
            assert {"seconds", "gb_per_s", "limit_seconds", "peak_worker_mem_gb",
                    "peak_client_mem_gb", "tasks"} <= set(s)
    plot(runs, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 10_000
