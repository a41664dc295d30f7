"""The run's report: one self-contained HTML page (figures inlined) plus the PNG files.

Figures, from the results store only: the PCA scree; autoencoder against PCA reconstruction error
at the same k; the loss curves; a 2-D view of the latent codes coloured by phase; the K-choice
curves; the phase maps (codes, PCA scores) with fractions; the phase mean spectra or patterns; a
latent traverse (the decoder's signal along each code coordinate); the orientation map (a chain
with a polar step); the anomaly map and the
score histogram with its threshold; seconds per stage. The client never holds a whole map (a
100 GB scan has 24 million pixels): maps are shown at every s-th pixel (at most ``MAX_SIDE`` per
side, more than a figure shows; the caption says so), histograms and the latent view use those
pixels, and the means and fractions printed are exact (dask reductions over the whole map).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from functools import partial
from pathlib import Path

import numpy as np

from emscale.stages.encode import latent_dim

log = logging.getLogger(__name__)

MAX_POINTS = 20_000
MAX_SIDE = 1024


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _figure().close(fig)
    path.write_bytes(buf.getvalue())
    return base64.b64encode(buf.getvalue()).decode()


def _stage(results, name):
    return results.open_stage(name) if results.has_stage(name) else None


def _view(arr, *, side: int | None = None, points: int | None = None) -> tuple[np.ndarray, int]:
    """Every s-th pixel of a (y, x, ...) map along y and x, read blockwise (the client gets the
    strided pixels only): at most ``side`` per side, or about ``points`` pixels; and s."""
    ny, nx = arr.shape[:2]
    step = max(1, int(np.ceil(max(ny, nx) / (side or MAX_SIDE))))
    if points is not None:
        step = max(1, int(np.ceil(np.sqrt(ny * nx / points))))
    view = arr.isel({arr.dims[0]: slice(None, None, step), arr.dims[1]: slice(None, None, step)})
    return np.asarray(view.values), step


def _extent(arr) -> tuple[float, float, float, float]:
    """imshow's extent of a (y, x) map in the scan's pixel indices (a strided view keeps them)."""
    ny, nx = arr.shape[:2]
    return (-0.5, nx - 0.5, ny - 0.5, -0.5)


def _aspect(arr) -> str:
    """Square pixels, unless the scan is a line or a thin strip: then the map fills the axes
    (a 1 x 400 line scan drawn with square pixels is a hairline)."""
    ny, nx = arr.shape[:2]
    return "auto" if max(ny, nx) > 8 * min(ny, nx) else "equal"


def _shown(step: int) -> str:
    return (f" Maps and histograms show one pixel in {step} along y and x; means and fractions "
            "are over all pixels." if step > 1 else "")


def _exact(*lazy):
    """Exact whole-map statistics, computed together (one pass over their maps)."""
    import dask

    return [float(v) for v in dask.compute(*lazy)]


def _warnings_html(cl, verdict: str | None = None) -> str:
    """What the cluster stage warned of (no phase structure, K at the edge of k_range,
    criteria that disagree, minor phases), and why the PCA map comes first if it does, first on
    the page: a reader decides with them."""
    if cl is None:
        return ""
    items = [f"{verdict}: the phase map of the PCA scores is shown first"] if verdict else []
    items += [(f"{'PCA scores' if key == 'pca_phase' else 'latent codes'}: {w}")
              for key in ("phase", "pca_phase") for w in cl.attrs.get(key, {}).get("warnings", [])]
    if not items:
        return ""
    rows = "".join(f"<li>{html.escape(w)}</li>" for w in items)
    return f"<section class='warnings'><h2>Warnings</h2><ul>{rows}</ul></section>"


def _truth_table(scores: dict | None) -> str:
    """For a synthetic scan: the run scored against its ground truth (an HTML table)."""
    if not scores:
        return ""
    names = {"ari_phase": "ARI of the phase map (autoencoder codes) vs the true phases",
             "ari_pca_phase": "ARI of the PCA-score phase map vs the true phases",
             "true_k": "true number of phases", "n_clusters": "phases found",
             "anomaly_recall": "anomalous pixels flagged (recall)",
             "anomaly_false_alarm_rate": "normal pixels flagged (false-alarm rate)",
             "recon_error_normal": "autoencoder error, normal pixels (mean)",
             "recon_error_anomalous": "autoencoder error, anomalous pixels (mean)",
             "pca_recon_error_normal": "PCA error, normal pixels (mean)",
             "pca_recon_error_anomalous": "PCA error, anomalous pixels (mean)"}
    rows = "".join(f"<tr><td>{html.escape(text)}</td><td>{scores[key]:.4g}</td></tr>"
                   for key, text in names.items() if scores.get(key) is not None)
    return ("<section><h2>Against the ground truth (synthetic scan)</h2><table>"
            f"{rows}</table><p>{scores['labelled_pixels']} labelled pixels, "
            f"{scores['anomalous_pixels']} anomalous (label -1).</p></section>")


def _autoencoder_verdict(scores: dict | None, enc) -> str | None:
    """Why the autoencoder has not earned its place in this run, or None: against the ground
    truth where there is one (the ARI of the two phase maps), else the reconstruction error at
    the same size (an autoencoder that reconstructs no better than PCA's linear subspace has no
    better codes to offer)."""
    if scores and scores.get("ari_phase") is not None and scores.get("ari_pca_phase") is not None:
        if scores["ari_pca_phase"] > scores["ari_phase"]:
            return (f"against the ground truth, the PCA scores' phase map is the better one "
                    f"(ARI {scores['ari_pca_phase']:.3f} against the autoencoder codes' "
                    f"{scores['ari_phase']:.3f})")
        return None
    if enc is None or "pca_recon_error" not in enc:
        return None
    ae, linear = _exact(enc["recon_error"].mean(), enc["pca_recon_error"].mean())
    if ae >= linear:
        return (f"the autoencoder reconstructs no better than PCA with as many components "
                f"(mean error {ae:.4g} against {linear:.4g})")
    return None


def _scree(add, plt, pca, train, enc, an, cl, timings) -> None:
    if pca is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ratio = pca["pca_scree"].values[:64]
    ax.semilogy(np.arange(1, len(ratio) + 1), ratio, ".-")
    k = pca.attrs["pca"]["suggested_k"]
    ax.axvline(k, color="C3", ls="--", label=f"elbow: k = {k}")
    ax.set(xlabel="component", ylabel="explained variance ratio", title="PCA scree")
    ax.legend()
    add("scree", "PCA scree", fig)


def _errors(add, plt, pca, train, enc, an, cl, timings) -> None:
    if enc is None or "pca_recon_error" not in enc:
        return
    (err, step), (perr, _) = _view(enc["recon_error"]), _view(enc["pca_recon_error"])
    mean_err, mean_perr = _exact(enc["recon_error"].mean(), enc["pca_recon_error"].mean())
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    lo = np.nanpercentile(np.concatenate([err.ravel(), perr.ravel()]), 1)
    hi = np.nanpercentile(np.concatenate([err.ravel(), perr.ravel()]), 99.5)
    for ax, v, t, m in ((axes[0], err, "autoencoder", mean_err), (axes[1], perr, "PCA", mean_perr)):
        im = ax.imshow(v, vmin=lo, vmax=hi, cmap="magma", extent=_extent(enc["recon_error"]),
                       aspect=_aspect(enc["recon_error"]))
        ax.set_title(f"{t} error (mean {m:.3g})")
        fig.colorbar(im, ax=ax, shrink=0.8)
    logx = lo > 0 and hi / lo > 20  # a log axis only for a wide range (its ticks crowd)
    bins = np.geomspace(lo, hi, 60) if logx else np.linspace(lo, hi, 60)
    axes[2].hist(perr.ravel()[np.isfinite(perr.ravel())], bins=bins, alpha=0.6, label="PCA")
    axes[2].hist(err.ravel()[np.isfinite(err.ravel())], bins=bins, alpha=0.6, label="autoencoder")
    if logx:
        axes[2].set_xscale("log")
    metric = {"poisson": "chi-square per feature", "mse": "mean squared residual"}.get(
        enc.attrs["encode"].get("error"), "error")
    axes[2].set(xlabel=metric, ylabel="pixels", title="error histogram")
    axes[2].legend()
    k_lat = latent_dim(enc)
    add("errors", f"Reconstruction error: autoencoder (latent size {k_lat}) and PCA "
        f"({k_lat} components)", fig, enc["recon_error"].attrs.get("long_name", "") + _shown(step))


def _loss(add, plt, pca, train, enc, an, cl, timings) -> None:
    if train is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(train["train_loss"].values, label="train")
    ax.plot(train["val_loss"].values, label="validation")
    best = train.attrs["train"].get("best_epoch")
    if best is not None and best >= 0:
        ax.axvline(best, color="C3", ls="--", label=f"best epoch {best}")
    ax.set(xlabel="epoch", ylabel="loss", title="training", yscale="log")
    ax.legend()
    add("loss", "Loss curves", fig)


def _phases(add, plt, pca, train, enc, an, cl, timings, verdict=None) -> None:
    if cl is None:
        return
    phase, step = _view(cl["phase"])
    k = int(cl.attrs["phase"]["n_clusters"])
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    if enc is not None:
        z = _view(enc["latent"], points=MAX_POINTS)[0].reshape(-1, latent_dim(enc))
        p = _view(cl["phase"], points=MAX_POINTS)[0].ravel()
        ok = np.isfinite(z).all(1) & (p >= 0)
        z, p = z[ok], p[ok]
        if z.shape[1] > 2:  # the plane of the codes' two main axes
            c = z - z.mean(0)
            z = c @ np.linalg.svd(c, full_matrices=False)[2][:2].T
        fig, ax = plt.subplots(figsize=(5, 4.2))
        ax.scatter(z[:, 0], z[:, 1], c=p, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, s=2, alpha=0.5)
        ax.set(title="latent codes by phase", xlabel="latent principal axis 1",
               ylabel="latent principal axis 2")
        add("latent", "Latent space", fig, f"{len(z)} sampled pixels, projected on the two "
            "principal axes of their codes")
    if "k_candidate" in cl.coords:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), layout="constrained")
        kk = cl["k_candidate"].values
        summary = cl.attrs["phase"]
        chosen_by, islands = summary["chosen_by"], summary.get("islands") or 0
        swept = k - islands  # the sweep's K; distinct minor populations are phases besides it
        for ax, name in zip(axes, ("inertia", "silhouette", "bic")):
            ax.plot(kk, cl[f"k_{name}"].values, "o-")
            if name == chosen_by or (name == "inertia" and chosen_by == "elbow"):
                ax.axvline(swept, color="C3", ls="--", label=f"chosen: K = {swept}")
                ax.legend(fontsize=8)
            ax.set(xlabel="K", title=name + (" (elbow)" if name == "inertia" else ""))
        caption = f"K = {k}, chosen by {chosen_by}"
        if islands:
            outside = (" (the curves: on the pixels outside the small populations)"
                       if summary.get("minor_populations") else "")
            caption = (f"K = {swept} chosen by {chosen_by}{outside}, and {islands} distinct "
                       f"minor population(s) made phases of their own: K = {k}")
        add("kchoice", "Choice of K", fig, caption)
    fractions = cl["phase_fraction"].values[:k]
    maps = [("phase", "autoencoder codes")]
    if "pca_phase" in cl:
        maps.insert(1 if verdict is None else 0, ("pca_phase", "PCA scores"))
    fig, axes = plt.subplots(1, len(maps), figsize=(6.2 * len(maps), 4.5), squeeze=False,
                             layout="constrained")
    for ax, (name, what) in zip(axes[0], maps):
        n = int(cl.attrs.get(name, {}).get("n_clusters", k))
        ax.imshow(np.ma.masked_less(_view(cl[name])[0], 0), cmap=cmap, vmin=-0.5,
                  vmax=cmap.N - 0.5, interpolation="nearest", extent=_extent(cl[name]),
                  aspect=_aspect(cl[name]))
        handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i % cmap.N)) for i in range(n)]
        ax.legend(handles, [f"phase {i}: {f:.1%}"
                            for i, f in enumerate(cl[f"{name}_fraction"].values[:n])],
                  loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
        ax.set_title(f"phase map of the {what}")
    first = ("PCA scores first: " + verdict + ". ") if verdict else ""
    add("phases", "Phase map", fig, first + _shown(step).strip())
    mean = cl["phase_mean_signal"]
    minor = set(cl.attrs["phase"].get("minor_phases", []))
    names = [f"phase {i}: {f:.1%}" + (" (minor)" if i in minor else "")
             for i, f in enumerate(fractions)]
    flagged = cl.get("anomaly_mean_signal")
    n_flagged = int(flagged.attrs.get("pixels", 0)) if flagged is not None else 0
    if mean.ndim == 2:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        axis = mean.dims[1]
        xs = cl[axis].values if axis in cl.coords else np.arange(mean.shape[1])
        for i in range(k):
            ax.plot(xs, mean.values[i], color=cmap(i), label=names[i])
        if n_flagged:
            ax.plot(xs, flagged.values, "k--", label=f"flagged anomalous: {n_flagged} pixels")
        ax.set(xlabel=f"{axis} ({cl[axis].attrs.get('units', '')})" if axis in cl.coords else axis,
               ylabel="mean preprocessed signal", title="phase mean spectra")
        ax.legend(fontsize=8)
    elif mean.dims[1:] == ("radius", "harmonic"):  # polar features: profiles along the radius
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained", sharex=True)
        radius = cl["radius"].values
        series = [(mean.values[i], names[i], cmap(i), "-") for i in range(k)]
        if n_flagged:
            series.append((flagged.values, f"flagged anomalous: {n_flagged} pixels", "k", "--"))
        for values, name, colour, style in series:
            axes[0].plot(radius, values[:, 0], style, color=colour, label=name)
            axes[1].plot(radius, values[:, 1:].max(axis=1), style, color=colour)
        units = cl["radius"].attrs.get("units", "")
        axes[0].set(title="azimuthal mean (harmonic 0)", ylabel="mean preprocessed signal",
                    xlabel=f"radius ({units})" if units else "radius")
        axes[1].set(title="strongest angular harmonic (m >= 1): spots",
                    xlabel=f"radius ({units})" if units else "radius")
        axes[0].legend(fontsize=8)
    else:
        panels = [(mean.values[i], names[i]) for i in range(k)]
        if n_flagged:
            panels.append((flagged.values, f"flagged: {n_flagged} px"))
        fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.6), squeeze=False)
        for ax, (image, title) in zip(axes[0], panels):
            ax.imshow(image, cmap="inferno")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    add("phase_mean", "Phase mean signals", fig, "exact means over all pixels of each phase"
        + (" and of the pixels flagged anomalous" if n_flagged else "")
        + "; minor: under cluster.min_phase_fraction of the pixels")


def _traverse(add, plt, pca, train, enc, an, cl, timings, steps: int = 7, max_dims: int = 8) -> None:
    """What each latent coordinate means: the decoder's signal as one coordinate goes from the
    5th to the 95th percentile of the codes, the others at their median (the lecture's latent
    traverse; for a variational autoencoder the prior's axes)."""
    if train is None or enc is None or cl is None or "phase_mean_signal" not in cl:
        return
    from emscale.model_spec import ModelSpec

    mean = cl["phase_mean_signal"]
    spec = ModelSpec.from_train_stage(train, mean.shape[1:])
    k = latent_dim(enc)
    z = _view(enc["latent"], points=MAX_POINTS)[0].reshape(-1, k)
    z = z[np.isfinite(z).all(1)]
    if not len(z):
        return
    dims = min(k, max_dims)
    centre, (lo, hi) = np.median(z, 0), np.percentile(z, [5, 95], axis=0)
    codes = np.repeat(centre[None], dims * steps, axis=0)
    for j in range(dims):
        codes[j * steps:(j + 1) * steps, j] = np.linspace(lo[j], hi[j], steps)
    signals = spec.decode(codes).reshape(dims, steps, *mean.shape[1:])
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, steps))
    if mean.ndim == 2:
        axis = mean.dims[1]
        xs = cl[axis].values if axis in cl.coords else np.arange(mean.shape[1])
        cols = min(dims, 4)
        rows = -(-dims // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False,
                                 layout="constrained", sharex=True)
        for j, ax in enumerate(axes.ravel()):
            if j >= dims:
                ax.axis("off")
                continue
            for i in range(steps):
                ax.plot(xs, signals[j, i], color=colours[i], lw=1)
            ax.set_title(f"z{j}: {lo[j]:.3g} .. {hi[j]:.3g}", fontsize=9)
        for ax in axes[-1]:
            ax.set_xlabel(f"{axis} ({cl[axis].attrs.get('units', '')})" if axis in cl.coords
                          else axis)
        for ax in axes[:, 0]:
            ax.set_ylabel("decoded signal")
    else:
        fig, axes = plt.subplots(dims, steps, figsize=(1.3 * steps, 1.3 * dims), squeeze=False)
        for j in range(dims):
            for i in range(steps):
                axes[j, i].imshow(signals[j, i], cmap="inferno")
                axes[j, i].set_xticks([])
                axes[j, i].set_yticks([])
            axes[j, 0].set_ylabel(f"z{j}", fontsize=8)
    kind = "variational autoencoder" if spec.config.get("variational") else "autoencoder"
    add("traverse", "Latent traverse", fig,
        f"the {kind}'s decoded signal as one latent coordinate goes from the 5th to the 95th "
        "percentile of the codes (dark to light), the others at their median"
        + (f"; the first {dims} of {k} coordinates" if dims < k else ""))


def _orientation(add, plt, pca, train, enc, an, cl, timings, pre=None) -> None:
    """The in-plane orientation map of a chain with a polar step: colour is the angle (cyclic),
    over the period of the most common symmetry."""
    if pre is None or "polar_orientation" not in pre:
        return
    angle, step = _view(pre["polar_orientation"])
    symmetry = _view(pre["polar_symmetry"])[0]
    found = symmetry[np.isfinite(symmetry) & (symmetry > 0)].astype(int)
    if not found.size:
        return
    m = int(np.bincount(found).argmax())
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(np.ma.masked_where(symmetry != m, angle), cmap="twilight", vmin=0,
                   vmax=360 / m, interpolation="nearest", extent=_extent(pre["polar_orientation"]),
                   aspect=_aspect(pre["polar_orientation"]))
    fig.colorbar(im, ax=ax, shrink=0.8, label="degree")
    ax.set_title(f"in-plane orientation ({m}-fold, modulo {360 / m:g} degrees)")
    share = float((symmetry == m).mean())
    add("orientation", "Orientation", fig,
        f"the phase of each pattern's strongest angular harmonic (polar step), relative within a "
        f"phase; pixels whose strongest harmonic is not {m} ({1 - share:.0%}) are blank."
        + _shown(step))


def _anomalies(add, plt, pca, train, enc, an, cl, timings) -> None:
    if an is None:
        return
    flagged = an["anomaly"]
    score, step = _view(an["anomaly_score"])
    shown_flags = _view(flagged)[0]
    (fraction,) = _exact(flagged.mean())
    thr = float(flagged.attrs["threshold"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    im = axes[0].imshow(score, cmap="viridis", extent=_extent(flagged), aspect=_aspect(flagged))
    if min(shown_flags.shape) >= 2:  # a contour needs two rows and two columns
        axes[0].contour(shown_flags, levels=[0.5], colors="red", linewidths=0.8,
                        extent=_extent(flagged), origin="upper")
        axes[0].set_title(f"anomaly score; {fraction:.2%} flagged (red)")
    else:
        axes[0].set_title(f"anomaly score; {fraction:.2%} flagged")
    fig.colorbar(im, ax=axes[0], shrink=0.8)
    s = score[np.isfinite(score)]
    axes[1].hist(s, bins=100, log=True)
    axes[1].axvline(thr, color="C3", ls="--", label=f"threshold {thr:.3g}")
    axes[1].set(xlabel="score", ylabel="pixels", title=f"{flagged.attrs['method']} score, "
                f"{flagged.attrs['calibration']} calibration")
    axes[1].legend()
    add("anomaly", "Anomalies", fig, _shown(step).strip())


def _timings(add, plt, pca, train, enc, an, cl, timings) -> None:
    if not timings:
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    names = list(timings)
    ax.barh(names, [timings[n] for n in names])
    ax.invert_yaxis()
    ax.set(xlabel="seconds", title="time per stage")
    add("timings", "Timings", fig, ", ".join(f"{n} {t:.1f} s" for n, t in timings.items()))


def write_report(results, out_dir: Path, timings: dict[str, float] | None = None) -> Path:
    """Write ``out_dir/index.html`` and its PNGs from the stages of ``results``."""
    plt = _figure()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pca, train = _stage(results, "pca"), _stage(results, "train")
    enc, an, cl = _stage(results, "encode"), _stage(results, "anomaly"), _stage(results, "cluster")
    sections: list[tuple[str, str, str]] = []  # (title, png base64, caption)

    def add(name, title, fig, caption=""):
        sections.append((title, _save(fig, out_dir / f"{name}.png"), caption))

    from emscale.evaluate import truth_scores

    scores = truth_scores(results)
    verdict = _autoencoder_verdict(scores, enc) if cl is not None else None
    pre = _stage(results, "preprocess")
    for section in (_scree, _errors, _loss, partial(_phases, verdict=verdict), _traverse,
                    partial(_orientation, pre=pre), _anomalies, _timings):
        section(add, plt, pca, train, enc, an, cl, timings)
    truth = _warnings_html(cl, verdict) + _truth_table(scores)
    prov = results.attrs.get("provenance", {})
    body = truth + "\n".join(
        f"<section><h2>{html.escape(t)}</h2><img src='data:image/png;base64,{b64}'>"
        f"<p>{html.escape(c)}</p></section>" for t, b64, c in sections)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>emscale report</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}img{{max-width:100%}}
pre{{background:#f4f4f4;padding:1em;overflow:auto;font-size:80%}}</style></head><body>
<h1>emscale report</h1><p>results: {html.escape(str(results.path))}</p>
{body}
<h2>Provenance</h2><pre>{html.escape(json.dumps(prov, indent=2, default=str))}</pre>
</body></html>"""
    index = out_dir / "index.html"
    index.write_text(page)
    log.info("report written to %s", index)
    return index
