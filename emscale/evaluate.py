"""Scores of a run against the ground truth of a synthetic scan (``label``: phase ids, -1 for
anomalous pixels; ``clean_features``: the noise-free signal through the same preprocessing).

Used by the report (a section for synthetic scans) and by ``emscale bench quality``. The maps are
(y, x) and small; the MSE against the clean signal is a blockwise reduction over the scan.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np


def truth_scores(results) -> dict | None:
    """ARI of the phase maps, anomaly recall and false-alarm rate, and the autoencoder's and
    PCA's reconstruction error on normal and anomalous pixels; None without ground truth.

    Every figure comes from one pass of dask reductions over the maps (contingency tables by
    ``bincount``, masked sums), so the client holds tables, never a whole map."""
    if not (results.has_stage("encode") and "label" in results.open_stage("encode")):
        return None
    enc = results.open_stage("encode")
    label = enc["label"].data.astype(np.int64)
    normal = label >= 0
    lazy: dict = {"labelled_pixels": normal.sum(), "anomalous_pixels": (~normal).sum(),
                  "label_max": label.max()}
    maps: dict = {}
    if results.has_stage("cluster"):
        cl = results.open_stage("cluster")
        maps = {name: cl[name].data.rechunk(label.chunks) for name in ("phase", "pca_phase")
                if name in cl}
        n_found = int(cl.sizes["cluster"])
        lazy["n_clusters"] = n_found
    if results.has_stage("anomaly"):
        flagged = results.open_stage("anomaly")["anomaly"].data.rechunk(label.chunks).astype(bool)
        lazy["flagged_anomalous"] = (flagged & ~normal).sum()
        lazy["flagged_normal"] = (flagged & normal).sum()
    for name in ("recon_error", "pca_recon_error"):
        if name in enc:
            err = enc[name].data.rechunk(label.chunks)
            for part, where in (("normal", normal), ("anomalous", ~normal)):
                ok = where & da.isfinite(err)
                lazy[f"{name}_{part}"] = (da.where(ok, err, 0).sum(dtype=np.float64), ok.sum())
    (lazy,) = dask.compute(lazy)
    n_normal, n_anom = int(lazy["labelled_pixels"]), int(lazy["anomalous_pixels"])
    out: dict = {"labelled_pixels": n_normal, "anomalous_pixels": n_anom}
    if maps:
        n_true = int(lazy["label_max"]) + 1
        # the (true phase, found phase) table of the labelled pixels, then ARI from it
        tables = dask.compute({name: _contingency(label, found, n_true, n_found)
                               for name, found in maps.items()})[0]
        for name, table in tables.items():
            out[f"ari_{name}"] = ari_from_contingency(table)
        out["true_k"] = n_true
        out["n_clusters"] = lazy["n_clusters"]
    if "flagged_normal" in lazy:
        out["anomaly_recall"] = float(lazy["flagged_anomalous"] / n_anom) if n_anom else None
        out["anomaly_false_alarm_rate"] = float(lazy["flagged_normal"] / max(n_normal, 1))
    for name in ("recon_error", "pca_recon_error"):
        for part in ("normal", "anomalous"):
            if f"{name}_{part}" in lazy:
                total, count = lazy[f"{name}_{part}"]
                out[f"{name}_{part}"] = float(total / count) if count else None
    return out


def _contingency(label: da.Array, found: da.Array, n_true: int, n_found: int) -> da.Array:
    """Counts of (true phase, found phase + 1) over the labelled pixels (found -1, an invalid
    pixel, is a column of its own, as in an ARI over the label arrays); a tree reduction."""
    cols = n_found + 1
    found = found.astype(np.int64) + 1
    index = da.where(label >= 0, label * cols + found, n_true * cols).ravel()
    return da.bincount(index, minlength=n_true * cols + 1)[:-1].reshape(n_true, cols)


def ari_from_contingency(table: np.ndarray) -> float:
    """The adjusted Rand index from a contingency table (scikit-learn's formula on its counts)."""
    from scipy.special import comb

    table = np.asarray(table, np.int64)
    n = int(table.sum())
    sum_cells = comb(table, 2).sum()
    sum_rows = comb(table.sum(axis=1), 2).sum()
    sum_cols = comb(table.sum(axis=0), 2).sum()
    pairs = comb(n, 2)
    expected = sum_rows * sum_cols / pairs if pairs else 0.0
    top = (sum_rows + sum_cols) / 2
    if top == expected:  # one cluster on both sides (or no pairs): sklearn's convention
        return 1.0
    return float((sum_cells - expected) / (top - expected))


def mse_against(estimate: da.Array, clean: da.Array, mask: np.ndarray | None = None) -> float:
    """Mean squared difference between two (y, x, feature...) arrays over the pixels of ``mask``
    (all pixels by default), as one tree reduction."""
    sq = ((estimate.astype(np.float32) - clean.astype(np.float32)) ** 2)
    per_pixel = sq.reshape(sq.shape[:2] + (-1,)).mean(axis=2, dtype=np.float64)
    if mask is not None:
        m = da.from_array(np.asarray(mask, bool), chunks=per_pixel.chunks)
        return float(da.where(m, per_pixel, 0).sum().compute() / max(int(np.sum(mask)), 1))
    return float(per_pixel.mean().compute())


def ground_truth_classes(attrs: dict, shape: tuple[int, int], rows: int = 256):
    """The ground-truth class of every pixel of a synthetic scan (from its store's attrs): its
    phase (0 .. P-1), or for an anomalous pixel its anomaly kind, numbered after the phases;
    and the class names. None for a scan without a generator."""
    from emscale.synth import generator_from_attrs

    if "generator" not in attrs:
        return None
    gen = generator_from_attrs(attrs)
    ny, nx = shape
    label, kind = (np.concatenate(parts) for parts in zip(*(
        gen.truth_block(y, min(y + rows, ny), 0, nx) for y in range(0, ny, rows))))
    n_phases = len(attrs.get("phase_names", [])) or int(label.max()) + 1
    names = list(attrs.get("phase_names", [])) or [f"phase {i}" for i in range(n_phases)]
    kinds = list(attrs.get("anomaly_names", ["none"]))[1:]
    classes = np.where(label >= 0, label, n_phases + kind.astype(np.int64) - 1)
    return classes.astype(np.int64), names + kinds, n_phases


def class_recall(classes: np.ndarray, names: list[str], n_phases: int, phase: np.ndarray,
                 flagged: np.ndarray) -> dict:
    """Per ground-truth class: its pixels, the share flagged anomalous, the share in a phase of
    its own (a found phase where it is the majority class) and the share that is either (issue
    16's "nothing distinct merged away"); and the false-alarm rate on the phases' pixels."""
    classes, phase, flagged = (np.asarray(a).ravel() for a in (classes, phase, flagged))
    flagged = flagged.astype(bool)
    n_cls = len(names)
    labelled = phase >= 0
    cols = max(int(phase.max()) + 1, 1)
    table = np.bincount(classes[labelled] * cols + phase[labelled],
                        minlength=n_cls * cols).reshape(n_cls, cols)
    majority = table.argmax(axis=0)  # the majority class of each found phase
    out = {}
    for c, name in enumerate(names):
        mine = classes == c
        if not mine.any():
            continue
        own = labelled[mine] & np.isin(phase[mine], np.flatnonzero(majority == c))
        out[name] = {"pixels": int(mine.sum()), "anomaly": c >= n_phases,
                     "flagged": float(flagged[mine].mean()), "own_phase": float(own.mean()),
                     "either": float((own | flagged[mine]).mean())}
    normal = classes < n_phases
    return {"classes": out, "false_alarm_rate": float(flagged[normal].mean()),
            "worst_either": min(v["either"] for v in out.values())}
