"""Side-by-side: dask-ml vs emscale's own code (k-means, blockwise predict, PCA).

emscale does not depend on dask-ml (README, "dask-ml, side by side"); this script is how that was
decided. Run, with dask-ml installed (``pip install dask-ml==2025.1.0`` into the environment):
      .venv/bin/python scripts/compare_dask_ml.py [--out results.json]
      (--small for a tiny syntax check; numbers from it mean nothing)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback

import numpy as np

# ------------------------------------------------------------------------------------------------
# worker-side helpers (module level; cloudpickle ships them by value from __main__)


def _trim_and_rss():
    """gc + malloc_trim, then this process's RSS in bytes (the baseline of a measurement)."""
    import ctypes
    import gc

    from emscale.bench.memory import vm_kib

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return vm_kib("VmRSS") * 1024


def _reset_peak():
    from emscale.bench.memory import reset_peak

    reset_peak()


def _peak():
    from emscale.bench.memory import peak_bytes

    return peak_bytes()


def _threads():
    import os

    return {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


class Measure:
    """Wall seconds and peak RSS (VmHWM) of each worker and of the client, around one call."""

    def __init__(self, client):
        self.client = client

    def __call__(self, fn):
        c = self.client
        base = c.run(_trim_and_rss)
        cbase = _trim_and_rss()
        c.run(_reset_peak)
        _reset_peak()
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        peaks = c.run(_peak)
        cpeak = _peak()
        return out, {
            "seconds": dt,
            "worker_peak_mib": max(peaks.values()) / 2**20,
            "worker_peak_over_base_mib": max(peaks[w] - base[w] for w in peaks) / 2**20,
            "worker_base_mib": max(base.values()) / 2**20,
            "client_peak_over_base_mib": (cpeak - cbase) / 2**20,
        }


# ------------------------------------------------------------------------------------------------
# data


def km_params(seed=12345, d=4):
    """4 anisotropic Gaussians (weights 0.4/0.3/0.2/0.1) + a box for 2% uniform outliers."""
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0, 0.0, 0.0],
                      [5.0, 2.0, -1.0, 0.5],
                      [-2.0, 5.0, 2.5, 1.0],
                      [2.5, -3.5, 3.5, -2.5]])[:, :d]
    chols = []
    for k in range(4):
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        scales = np.array([1.6, 0.9, 0.5, 0.3])[:d] * (1.0 - 0.15 * k)
        chols.append(q * scales)  # cov = q diag(s^2) q^T
    lo, hi = means.min(0) - 6.0, means.max(0) + 6.0
    return {"means": means, "chols": np.array(chols), "weights": np.array([0.4, 0.3, 0.2, 0.1]),
            "lo": lo, "hi": hi, "outlier_fraction": 0.02}


def km_block(i, n, seed, p):
    """Rows of block i: columns 0..d-1 the codes, column d the true label (4 = outlier)."""
    rng = np.random.default_rng([seed, i])
    d = p["means"].shape[1]
    lab = rng.choice(4, size=n, p=p["weights"])
    z = rng.standard_normal((n, d))
    x = p["means"][lab] + np.einsum("nij,nj->ni", p["chols"][lab], z)
    out = rng.random(n) < p["outlier_fraction"]
    x[out] = rng.uniform(p["lo"], p["hi"], size=(int(out.sum()), d))
    lab = np.where(out, 4, lab)
    return np.column_stack([x, lab]).astype(np.float64)


def make_km_data(client, n, d, chunk, seed=2024):
    import dask
    import dask.array as da
    from distributed import wait

    p = km_params(d=d)
    sizes = [min(chunk, n - s) for s in range(0, n, chunk)]
    parts = [da.from_delayed(dask.delayed(km_block, pure=True)(i, m, seed, p), (m, d + 1), np.float64)
             for i, m in enumerate(sizes)]
    arr = da.concatenate(parts)
    x = arr[:, :d].astype(np.float32)
    y = arr[:, d].astype(np.int8)
    x, y = client.persist([x, y])
    wait([x, y])
    return x, y


def pca_params(f, rank=8, seed=777):
    rng = np.random.default_rng(seed)
    w, _ = np.linalg.qr(rng.standard_normal((f, rank)))
    sd = np.array([20.0, 15.0, 10.0, 8.0, 6.0, 5.0, 4.0, 3.0])[:rank]
    mean = rng.uniform(20.0, 100.0, f)
    return {"w": w.T.copy(), "sd": sd, "mean": mean, "noise": 1.0}


def pca_block(i, n, seed, p):
    rng = np.random.default_rng([seed, i])
    s = rng.standard_normal((n, len(p["sd"]))) * p["sd"]
    x = p["mean"] + s @ p["w"] + p["noise"] * rng.standard_normal((n, p["w"].shape[1]))
    return x.astype(np.float32)


def make_pca_data(client, n, f, chunk, seed=99):
    import dask
    import dask.array as da
    from distributed import wait

    p = pca_params(f)
    sizes = [min(chunk, n - s) for s in range(0, n, chunk)]
    x = da.concatenate([da.from_delayed(dask.delayed(pca_block, pure=True)(i, m, seed, p),
                                        (m, f), np.float32) for i, m in enumerate(sizes)])
    x = client.persist(x)
    wait(x)
    return x, p


def exact_subspace(x, ref_mean, k):
    """Top-k eigenvectors (f x k) of the float64 covariance of x (computed on the cluster)."""
    import dask
    import dask.array as da

    xc = x.astype(np.float64) - ref_mean
    g, s = dask.compute(da.dot(xc.T, xc), xc.sum(0))
    n = x.shape[0]
    cov = (g - np.outer(s, s) / n) / (n - 1)
    val, vec = np.linalg.eigh(cov)
    order = np.argsort(val)[::-1]
    return vec[:, order[:k]], val[order]


def max_angle(ref, comps):
    from scipy.linalg import subspace_angles

    return float(np.max(subspace_angles(ref, np.asarray(comps, np.float64).T)))


# ------------------------------------------------------------------------------------------------
# the comparisons


def inertia(xnp, labels, centres):
    c = np.asarray(centres, np.float64)
    lab = np.asarray(labels)
    tot = 0.0
    for s in range(0, len(xnp), 1 << 18):
        r = xnp[s:s + (1 << 18)].astype(np.float64) - c[lab[s:s + (1 << 18)]]
        tot += float(np.einsum("ij,ij->", r, r))
    return tot


def err_text(e):
    return f"{type(e).__name__}: {e}"[:600]


def run_kmeans(client, measure, x, xnp, truth, ari_idx, seeds):
    from dask_ml.cluster import KMeans as DKMeans
    from sklearn.metrics import adjusted_rand_score

    from emscale.stages.cluster import PhaseClustering

    rows = []
    for s in seeds:
        for method in ("emscale", "dask-ml") if s % 2 == 0 else ("dask-ml", "emscale"):
            rec = {"method": method, "seed": s, "started": time.strftime("%H:%M:%S")}
            try:
                if method == "emscale":
                    model, m_fit = measure(lambda: PhaseClustering("kmeans", n_clusters=4, seed=s).fit(x))
                    labels, m_pred = measure(lambda: model.predict(x).compute())
                    centres, n_iter = model.cluster_centers_, model.n_iter_
                else:
                    model, m_fit = measure(lambda: DKMeans(n_clusters=4, init="k-means||",
                                                           random_state=s).fit(x))
                    labels, m_pred = measure(lambda: model.predict(x).compute())
                    centres, n_iter = model.cluster_centers_, model.n_iter_
                rec.update({"fit": m_fit, "predict": m_pred, "n_iter": int(n_iter),
                            "inertia": inertia(xnp, labels, centres),
                            "ari": float(adjusted_rand_score(truth[ari_idx], labels[ari_idx]))})
            except Exception as e:  # noqa: BLE001
                rec["error"] = err_text(e)
                traceback.print_exc()
            print(json.dumps(rec), flush=True)
            rows.append(rec)
    return rows


def run_postfit(client, measure, x, xnp, reps):
    from dask_ml.wrappers import ParallelPostFit
    from sklearn.cluster import KMeans

    from emscale.stages.cluster import PhaseClustering

    ours = PhaseClustering("kmeans", n_clusters=4, seed=0).fit(x)
    sk = KMeans(4, n_init=1, random_state=0).fit(xnp[:20000])
    sk.cluster_centers_ = ours.cluster_centers_.astype(np.float32)  # the same model both ways
    ppf = ParallelPostFit(estimator=sk)
    out = {"emscale": [], "dask-ml ParallelPostFit": []}
    labs = {}
    for r in range(reps):
        for name, fn in (("emscale", lambda: ours.predict(x).compute()),
                         ("dask-ml ParallelPostFit", lambda: ppf.predict(x).compute()))[::1 if r % 2 == 0 else -1]:
            result = measured_run(out, name, measure, fn)
            if result is not None:
                labs[name] = result
    agree = (float((labs["emscale"] == labs["dask-ml ParallelPostFit"]).mean())
             if len(labs) == 2 else None)
    return {"runs": out, "label_agreement": agree}


def measured_run(out, name, measure, fn, extra=None):
    """Run ``fn`` under ``measure``, append its figures (or its error) to ``out[name]``, print
    them; return its result (None on error)."""
    result = None
    try:
        started = time.strftime("%H:%M:%S")
        result, m = measure(fn)
        m.update(extra(result) if extra else {}, started=started)
        out[name].append(m)
    except Exception as e:  # noqa: BLE001
        out[name].append({"error": err_text(e)})
        traceback.print_exc()
    print(name, json.dumps(out[name][-1]), flush=True)
    return result


PCA_METHODS = {
    "emscale gram": ("emscale", {}),
    "dask-ml full": ("dask-ml", {"svd_solver": "full"}),
    "dask-ml randomized (iterated_power=0, default)": ("dask-ml", {"svd_solver": "randomized",
                                                                   "random_state": 0}),
    "dask-ml randomized (iterated_power=4)": ("dask-ml", {"svd_solver": "randomized",
                                                          "iterated_power": 4, "random_state": 0}),
}


def fit_pca(kind, kw, x, k):
    if kind == "emscale":
        from emscale.stages.pca import PCA

        return PCA(k, solver="gram").fit(x).components_
    from dask_ml.decomposition import PCA as DPCA

    return np.asarray(DPCA(n_components=k, **kw).fit(x).components_)[:k]


def run_pca(client, measure, x, ref, k, reps):
    """Methods interleaved within each repetition, so that outside load hits them alike."""
    out = {name: [] for name in PCA_METHODS}
    for r in range(reps):
        for name, (kind, kw) in PCA_METHODS.items():
            if out[name] and "error" in out[name][-1]:
                continue
            measured_run(out, name, measure, lambda kind=kind, kw=kw: fit_pca(kind, kw, x, k),
                         extra=lambda comps: {"max_angle_rad": max_angle(ref, comps)})
    return out


# ------------------------------------------------------------------------------------------------
# reporting


def ms(vals, fmt="{:.2f}"):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    a = np.asarray(vals, float)
    if len(a) == 1:
        return fmt.format(a[0])
    return f"{fmt.format(a.mean())} ± {fmt.format(a.std(ddof=1))} [{fmt.format(a.min())}–{fmt.format(a.max())}]"


def report(res):
    lines = []
    km = res["kmeans"]
    lines += [f"### 1. k-means, K=4, N={res['config']['km_n']:,} x d={res['config']['km_d']} float32, "
              f"chunks {res['config']['km_chunk']} rows; seeds {res['config']['seeds']} "
              "(mean ± sd [min–max])", "",
              "| method | fit s | predict s | fit peak worker MiB (over base) | predict peak worker MiB (over base) "
              "| client peak over base MiB (fit) | Lloyd iters | inertia | inertia excess over best run (ppm) | ARI (inlier sample) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    best = min((r["inertia"] for r in km if "error" not in r), default=None)
    for method in ("emscale", "dask-ml"):
        rs = [r for r in km if r["method"] == method and "error" not in r]
        errs = [r for r in km if r["method"] == method and "error" in r]
        if rs:
            lines.append("| " + " | ".join([
                method,
                ms([r["fit"]["seconds"] for r in rs]),
                ms([r["predict"]["seconds"] for r in rs]),
                f"{ms([r['fit']['worker_peak_mib'] for r in rs], '{:.0f}')} "
                f"({ms([r['fit']['worker_peak_over_base_mib'] for r in rs], '{:.0f}')})",
                f"{ms([r['predict']['worker_peak_mib'] for r in rs], '{:.0f}')} "
                f"({ms([r['predict']['worker_peak_over_base_mib'] for r in rs], '{:.0f}')})",
                ms([r["fit"]["client_peak_over_base_mib"] for r in rs], "{:.0f}"),
                ms([r["n_iter"] for r in rs], "{:.1f}"),
                ms([r["inertia"] for r in rs], "{:.8g}"),
                ms([1e6 * (r["inertia"] / best - 1) for r in rs], "{:.2f}"),
                ms([r["ari"] for r in rs], "{:.4f}")]) + " |")
        for r in errs:
            lines.append(f"| {method} seed {r['seed']} | FAILED: {r['error']} |")
    pf = res["postfit"]
    lines += ["", "### 2. blockwise predict of the same fitted centres on the same array "
              f"({len(next(iter(pf['runs'].values())))} reps; label agreement {pf['label_agreement']})", "",
              "| method | seconds | peak worker MiB | peak worker over base MiB | client peak over base MiB |",
              "|---|---|---|---|---|"]
    for name, runs in pf["runs"].items():
        lines += _rows(name, runs, [("seconds", "{:.3f}")] + MEMORY_COLUMNS)
    c = res["config"]
    lines += ["", f"### 3. PCA, k=8, {c['pca_n']:,} x {c['pca_f']} float32 (rank-8 signal + noise), "
              f"chunks {c['pca_chunk']} rows; {c['pca_reps']} reps", "",
              "| method | fit s | peak worker MiB | peak worker over base MiB | client peak over base MiB "
              "| max principal angle (rad) vs exact f64 |", "|---|---|---|---|---|---|"]
    for name, runs in res["pca"].items():
        lines += _rows(name, runs, [("seconds", "{:.2f}")] + MEMORY_COLUMNS
                       + [("max_angle_rad", "{:.3e}")])
    return "\n".join(lines)


MEMORY_COLUMNS = [("worker_peak_mib", "{:.0f}"), ("worker_peak_over_base_mib", "{:.0f}"),
                  ("client_peak_over_base_mib", "{:.0f}")]


def _rows(name, runs, columns):
    """A table row of mean +- sd per column over the runs that worked, and a row per failure."""
    ok = [r for r in runs if "error" not in r]
    rows = [f"| {name} | " + " | ".join(ms([r[key] for r in ok], fmt) for key, fmt in columns)
            + " |"] if ok else []
    return rows + [f"| {name} | FAILED: {r['error']} |" for r in runs if "error" in r]


# ------------------------------------------------------------------------------------------------


def versions():
    import dask
    import dask_ml
    import distributed
    import numba
    import scipy
    import sklearn

    import emscale

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "numpy": np.__version__, "scipy": scipy.__version__, "dask": dask.__version__,
            "distributed": distributed.__version__, "dask_ml": dask_ml.__version__,
            "scikit-learn": sklearn.__version__, "numba": numba.__version__,
            "emscale": getattr(emscale, "__version__", "?") + " @ " + emscale.__file__}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny sizes: a syntax check only")
    ap.add_argument("--out", default="dask-ml-comparison.json")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: kmeans,postfit,pca")
    ap.add_argument("--postfit-reps", type=int)
    ap.add_argument("--pca-reps", type=int)
    ap.add_argument("--seeds", help="comma list, e.g. 0,1,2")
    ap.add_argument("--log-daskml", action="store_true", help="dask-ml's own INFO timing log")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    if a.small:
        cfg = dict(km_n=40_000, km_d=4, km_chunk=8192, seeds=[0, 1], ari_n=10_000, postfit_reps=2,
                   pca_n=8192, pca_f=64, pca_chunk=2048, pca_reps=1)
    else:
        cfg = dict(km_n=1_000_000, km_d=4, km_chunk=65536, seeds=[0, 1, 2], ari_n=200_000,
                   postfit_reps=3, pca_n=200_000, pca_f=1024, pca_chunk=16384, pca_reps=2)

    if a.postfit_reps:
        cfg["postfit_reps"] = a.postfit_reps
    if a.pca_reps:
        cfg["pca_reps"] = a.pca_reps
    if a.seeds:
        cfg["seeds"] = [int(v) for v in a.seeds.split(",")]
    if a.log_daskml:
        import logging

        logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("dask_ml.cluster.k_means").setLevel(logging.INFO)

    import dask
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    client = Client(cluster)
    measure = Measure(client)
    res = {"config": cfg, "versions": versions(), "worker_env": client.run(_threads)}
    print(json.dumps(res["versions"]), json.dumps(res["worker_env"]), flush=True)

    # warm-up (discarded): imports on workers, numba JIT of dask-ml's _centers_dense, BLAS init
    t0 = time.perf_counter()
    xw, _ = make_km_data(client, 20_000, cfg["km_d"], 4096, seed=1)
    xwn = xw.compute()
    run_kmeans(client, measure, xw, xwn, np.zeros(len(xwn), int), np.arange(100), [0])
    run_postfit(client, measure, xw, xwn, 1)
    pw, pp = make_pca_data(client, 4096, 64, 1024, seed=1)
    run_pca(client, measure, pw, exact_subspace(pw, pp["mean"], 8)[0], 8, 1)
    del xw, pw
    print(f"warm-up done in {time.perf_counter() - t0:.1f}s\n", flush=True)

    if "kmeans" not in skip or "postfit" not in skip:
        x, y = make_km_data(client, cfg["km_n"], cfg["km_d"], cfg["km_chunk"])
        xnp, truth = dask.compute(x, y)
        res["km_true_counts"] = np.bincount(truth, minlength=5).tolist()
        inliers = np.flatnonzero(truth < 4)
        ari_idx = np.sort(np.random.default_rng(7).choice(inliers, cfg["ari_n"], replace=False))
        if "kmeans" not in skip:
            res["kmeans"] = run_kmeans(client, measure, x, xnp, truth, ari_idx, cfg["seeds"])
        if "postfit" not in skip:
            res["postfit"] = run_postfit(client, measure, x, xnp, cfg["postfit_reps"])
        del x, y, xnp
    if "pca" not in skip:
        xp, p = make_pca_data(client, cfg["pca_n"], cfg["pca_f"], cfg["pca_chunk"])
        t0 = time.perf_counter()
        ref, eigval = exact_subspace(xp, p["mean"], 8)
        print(f"exact f64 covariance + eigh: {time.perf_counter() - t0:.1f}s; top 10 eigenvalues "
              f"{np.round(eigval[:10], 3).tolist()}", flush=True)
        res["pca_eigenvalues_top10"] = eigval[:10].tolist()
        res["pca_truth_angle_exact_vs_generator"] = max_angle(ref, p["w"])
        res["pca"] = run_pca(client, measure, xp, ref, 8, cfg["pca_reps"])
        del xp

    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, default=float)
    if not skip:
        md = report(res)
        print("\n" + md)
        with open(a.out.replace(".json", ".md"), "w") as f:
            f.write(md + "\n")
    client.close()
    cluster.close()


if __name__ == "__main__":
    main()
