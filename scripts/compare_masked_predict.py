"""k-means labels of 1,000,000 x 4 codes with 1 % NaN rows and 2 % invalid pixels (label -1),
end to end on a LocalCluster of 2 x 1: emscale's ``PhaseClustering.predict`` (``own``) against
dask-ml's ``ParallelPostFit`` around scikit-learn's KMeans with the mask around it (``postfit``,
needs dask-ml); the same fitted centres, five timed repeats after a warm-up.
Run: .venv/bin/python scripts/compare_masked_predict.py own|postfit"""
import json
import sys
import time

import dask.array as da
import numpy as np
from distributed import Client, LocalCluster, wait

def main(label):
    import emscale
    from emscale.bench.memory import peak_bytes, reset_peak
    from emscale.stages.cluster import PhaseClustering
    rng = np.random.default_rng(0)
    n, d = 1_000_000, 4
    centres = rng.normal(scale=4, size=(4, d))
    lab = rng.choice(4, size=n, p=[0.4, 0.3, 0.2, 0.1])
    x = (centres[lab] + rng.normal(size=(n, d))).astype(np.float32)
    x[rng.random(n) < 0.01] = np.nan  # invalid pixels
    valid = rng.random(n) > 0.02
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        xd = client.persist(da.from_array(x, chunks=(65536, d)))
        vd = client.persist(da.from_array(valid, chunks=(65536,)))
        wait([xd, vd])
        c = PhaseClustering(n_clusters=4, n_init=3, seed=0).fit(xd, vd)
        predict = c.predict
        if label == "postfit":  # dask-ml's wrapper around scikit-learn's KMeans, masked around it
            from dask_ml.wrappers import ParallelPostFit
            from sklearn.cluster import KMeans
            km = KMeans(4, n_init=1, random_state=0).fit(c.cluster_centers_)
            km.cluster_centers_ = np.ascontiguousarray(c.cluster_centers_, np.float64)
            def predict(x, v):
                keep = da.isfinite(x).all(axis=1) & v
                filled = da.where(keep[:, None], x, 0).astype(np.float64)
                lab = ParallelPostFit(km).predict(filled).astype(np.int32)
                return da.where(keep, lab, np.int32(-1))
        c.predict = predict
        c.predict(xd, vd).compute()  # warm-up
        times, peaks = [], []
        for _ in range(5):
            client.run(reset_peak)
            t0 = time.perf_counter()
            out = c.predict(xd, vd).compute()
            times.append(time.perf_counter() - t0)
            peaks.append(max(client.run(peak_bytes).values()) / 2**20)
        print(json.dumps({"code": label, "emscale": emscale.__file__, "seconds": times,
                          "median_s": float(np.median(times)), "peak_worker_mib": max(peaks),
                          "labels_sha": int(np.sum(out.astype(np.int64) * np.arange(n) % 1000003)),
                          "invalid_labelled_minus1": bool((out[~valid] == -1).all())}))

if __name__ == "__main__":
    main(sys.argv[1])
