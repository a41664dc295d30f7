"""Scores of a run against the ground truth of a synthetic scan (``label``: phase ids, -1 for
anomalous pixels; ``clean_features``: the noise-free signal through the same preprocessing).

Used by the report (a section for synthetic scans) and by ``emscale bench quality``. The maps are
(y, x) and small; the MSE against the clean signal is a blockwise reduction over the scan.
"""

from __future__ import annotations

import dask.array as da
import numpy as np


def truth_scores(results) -> dict | None:
    """ARI of the phase maps, anomaly recall and false-alarm rate, and the autoencoder's and
    PCA's reconstruction error on normal and anomalous pixels; None without ground truth."""
    from sklearn.metrics import adjusted_rand_score

    if not (results.has_stage("encode") and "label" in results.open_stage("encode")):
        return None
    enc = results.open_stage("encode")
    label = np.asarray(enc["label"].values)
    normal = label >= 0
    out: dict = {"labelled_pixels": int(normal.sum()), "anomalous_pixels": int((~normal).sum())}
    if results.has_stage("cluster"):
        cl = results.open_stage("cluster")
        for name in ("phase", "pca_phase"):
            if name in cl:
                out[f"ari_{name}"] = float(adjusted_rand_score(label[normal],
                                                               np.asarray(cl[name].values)[normal]))
        out["true_k"] = int(label.max()) + 1
        out["n_clusters"] = int(cl.sizes["cluster"])
    if results.has_stage("anomaly"):
        flagged = np.asarray(results.open_stage("anomaly")["anomaly"].values)
        out["anomaly_recall"] = float(flagged[~normal].mean()) if (~normal).any() else None
        out["anomaly_false_alarm_rate"] = float(flagged[normal].mean())
    for name in ("recon_error", "pca_recon_error"):
        if name in enc:
            err = np.asarray(enc[name].values)
            out[f"{name}_normal"] = float(np.nanmean(err[normal]))
            out[f"{name}_anomalous"] = float(np.nanmean(err[~normal])) if (~normal).any() else None
    return out


def mse_against(estimate: da.Array, clean: da.Array, mask: np.ndarray | None = None) -> float:
    """Mean squared difference between two (y, x, feature...) arrays over the pixels of ``mask``
    (all pixels by default), as one tree reduction."""
    sq = ((estimate.astype(np.float32) - clean.astype(np.float32)) ** 2)
    per_pixel = sq.reshape(sq.shape[:2] + (-1,)).mean(axis=2, dtype=np.float64)
    if mask is not None:
        m = da.from_array(np.asarray(mask, bool), chunks=per_pixel.chunks)
        return float(da.where(m, per_pixel, 0).sum().compute() / max(int(np.sum(mask)), 1))
    return float(per_pixel.mean().compute())
