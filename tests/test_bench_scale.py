"""``emscale bench scale``: the shipped workflow end to end, figures per stage, memory bounded.

Timings are printed by the benchmark, never asserted; what is asserted is what a run must show:
every stage measured, the JSON the issue asks for, a plot, and peak memory that does not grow
with the scan (an 8x larger scan, the same chunks)."""

import json

from emscale.bench.scale import ScaleRun, plot, run_scale_bench, scaling, write_json
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
    print({n: (s["passes"], s["results_gb_read"]) for n, s in large.stages.items()})
    # the scan's passes are counted apart from the results a stage reads back: anomaly scoring
    # reads codes and errors only, the cluster stage codes and the scan once (the phase means)
    anomaly, cluster = large.stages["anomaly"], large.stages["cluster"]
    assert anomaly["passes"] == 0 and anomaly["results_gb_read"] > 0
    assert cluster["passes"] >= 0.9 and cluster["results_gb_read"] > 0
    assert large.results_gb_per_s > 0
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
    assert data["scaling"] == {}  # (both scans under 4 GB)
    assert scaling(runs, from_gb=0)["eels"]["sizes_gb"] == [0.004, 0.032]
    plot(runs, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 10_000


def _run(size_gb, seconds):
    return ScaleRun(kind="eels", size_gb=size_gb, shape=[], store_gb=0, synth_seconds=None,
                    floor_seconds=1, floor_gb_per_s=1, end_to_end_seconds=sum(seconds.values()),
                    end_to_end_ratio_to_floor=1, end_to_end_ratio_to_limit=1,
                    end_to_end_ratio_to_limit_with_chain=1, disk_gb=0, rates={},
                    stages={name: {"seconds": s, "limit_seconds": None if name == "train"
                                   else 3.5 * size_gb} for name, s in seconds.items()})


def test_scaling_takes_the_slope_between_sizes_without_training():
    # 20 s fixed (a K sweep), 7 s a GB, training 50 s whatever the size: linear, slopes equal
    runs = [_run(g, {"pca": 20 + 7 * g, "train": 50}) for g in (100, 1, 4, 16)]
    sc = scaling(runs)["eels"]  # from 4 GB up, sorted by size
    assert sc["sizes_gb"] == [4, 16, 100] and sc["seconds_without_training"] == [48, 132, 720]
    assert sc["marginal_seconds_per_gb"] == [7, 7] and sc["marginal_spread"] == 0
    assert sc["seconds_per_gb"][0] == 12  # the fixed cost weighs at 4 GB: not a slope
    assert sc["marginal_ratio_to_limit"] == [0.5, 0.5]  # limits 3.5 s a GB: fixed cost out
    runs.append(_run(200, {"pca": 20 + 7 * 100 + 9 * 100, "train": 50}))  # 9 s a GB above 100
    assert abs(scaling(runs)["eels"]["marginal_spread"] - (9 / 7 - 1)) < 1e-12
