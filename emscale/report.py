"""The run's report: one self-contained HTML page (figures inlined) plus the PNG files.

First a summary in words (the scan, its kind and size with calibrations, the preprocessing, K and
how it was chosen, the phases' shares, minor phases, the share flagged anomalous, training with
its early stop, total time, warnings). Figures, from the results store only: the PCA scree (its
elbow k beside the k the comparisons use); autoencoder against PCA reconstruction error at the
same k; the loss curves (best epoch and early stop marked); a 2-D view of the latent codes
coloured by phase; the K-choice curves; the phase maps (codes, PCA scores) with fractions and the
anomalous pixels outlined; the phase mean spectra or patterns; a latent traverse (the decoder's
signal along each code coordinate); the orientation map (a chain with a polar step); the anomaly
map and the score histogram with its threshold; seconds per stage. Maps are drawn in the scan's
calibrated coordinates (y/x with their units) with a scale bar, in pixels where the scan has no
calibration; every colour bar and axis says its units. The client never holds a whole map (a
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


UNCALIBRATED = {"", "px", "pixel", "pixels", "channel", "channels"}


def _axis(arr, dim) -> tuple[np.ndarray, str | None]:
    """An axis of ``arr``: its coordinate values and units, or pixel indices and None where the
    axis has no calibration (no coordinate, no units, or marked ``calibrated: False``)."""
    if dim in arr.coords:
        coord = arr[dim]
        units = str(coord.attrs.get("units") or "")
        if units.lower() not in UNCALIBRATED and coord.attrs.get("calibrated", True):
            return np.asarray(coord.values, dtype=float), units
    return np.arange(arr.sizes[dim], dtype=float), None


def _step(values: np.ndarray) -> float:
    return float(values[1] - values[0]) if len(values) > 1 else 1.0


def _calibrated(arr, dims=None) -> str | None:
    """The common units of ``arr``'s first two axes (a scan's y and x), or None: pixels."""
    dims = dims or arr.dims[:2]
    units = {_axis(arr, d)[1] for d in dims}
    return units.pop() if len(units) == 1 and None not in units else None


def _extent(arr, dims=None) -> tuple[float, float, float, float]:
    """imshow's extent of a (y, x) map (or of a pattern's (ky, kx) with ``dims``): the outer
    pixel edges in the axes' calibrated coordinates, or pixel indices where they have none (the
    full map's coordinates: a strided view is drawn over the same area)."""
    dims = dims or arr.dims[:2]
    if _calibrated(arr, dims) is None:
        ys, xs = (np.arange(arr.sizes[d], dtype=float) for d in dims)
    else:
        ys, xs = (_axis(arr, d)[0] for d in dims)
    dy, dx = _step(ys), _step(xs)
    return (xs[0] - dx / 2, xs[-1] + dx / 2, ys[-1] + dy / 2, ys[0] - dy / 2)


def _aspect(arr) -> str:
    """Square pixels, unless the scan is a line or a thin strip: then the map fills the axes
    (a 1 x 400 line scan drawn with square pixels is a hairline)."""
    ny, nx = arr.shape[:2]
    return "auto" if max(ny, nx) > 8 * min(ny, nx) else "equal"


def _round_length(span: float) -> float:
    """A round scale-bar length (1, 2 or 5 times a power of ten) near a fifth of ``span``."""
    target = abs(span) / 5
    if not target > 0:
        return 0.0
    power = 10 ** np.floor(np.log10(target))
    return float(next(m * power for m in (5, 2, 1) if m * power <= target))


def _space_axes(ax, arr, dims=None, bar: bool = True) -> str | None:
    """Label a map's axes with their units ("pixels" where the scan has no calibration) and,
    when calibrated, draw a scale bar of a round length; the units, or None."""
    dims = dims or arr.dims[:2]
    units = _calibrated(arr, dims)
    ax.set_xlabel(f"{dims[1]} ({units or 'pixels'})")
    ax.set_ylabel(f"{dims[0]} ({units or 'pixels'})")
    left, right, bottom, top = _extent(arr, dims)
    length = _round_length(right - left)
    if bar and units and length and _aspect(arr) == "equal":
        from matplotlib.font_manager import FontProperties
        from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

        scalebar = AnchoredSizeBar(ax.transData, length, f"{length:g} {units}", "lower right",
                                   pad=0.3, borderpad=0.5, sep=3, color="black", frameon=True,
                                   size_vertical=abs(bottom - top) / 80,
                                   fontproperties=FontProperties(size=8))
        scalebar.patch.set(alpha=0.75, edgecolor="none")
        scalebar.set_gid(f"scale bar: {length:g} {units}")
        ax.add_artist(scalebar)
    return units


def _draw_map(ax, arr, image, **kwargs):
    """``image`` (a strided view of the map ``arr``) on ``ax`` in the scan's coordinates, with
    labelled axes and a scale bar."""
    im = ax.imshow(image, extent=_extent(arr), aspect=_aspect(arr), **kwargs)
    _space_axes(ax, arr)
    return im


def _overlay_flags(ax, arr, flags, colour="red", width=1.2) -> bool:
    """The outline of the flagged pixels (a strided view) over a map; False where a contour
    cannot be drawn (one row or column)."""
    if flags is None or min(flags.shape) < 2 or not flags.any():
        return False
    ax.contour(flags.astype(float), levels=[0.5], colors=colour, linewidths=width,
               extent=_extent(arr), origin="upper")
    return True


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


def _compared_k(train, enc) -> int | None:
    """The k at which PCA is compared with the autoencoder: its latent size."""
    if enc is not None:
        return int(enc.attrs["encode"].get("pca_k", latent_dim(enc)))
    if train is not None:
        return int(train.attrs["train"]["config"]["latent_dim"])
    return None


def _scree(add, plt, pca, train, enc, an, cl, timings) -> None:
    if pca is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ratio = pca["pca_scree"].values[:64]
    ax.semilogy(np.arange(1, len(ratio) + 1), ratio, ".-", color="0.3")
    facts = pca.attrs["pca"]
    k, error_k, used = facts["suggested_k"], facts.get("error_k"), _compared_k(train, enc)
    ax.axvline(k, color="C3", ls="--", label=f"scree elbow: k = {k}")
    if used is not None and used != k:
        ax.axvline(used, color="C0", ls=":", lw=2,
                   label=f"k = {used}: autoencoder latent size, PCA compared at it")
    ax.set(xlabel="component", ylabel="explained variance ratio", title="PCA scree")
    ax.legend(fontsize=8)
    caption = (f"The elbow (k = {k}) is where the explained variance levels off onto the noise "
               f"floor: an estimate of how many components carry signal")
    if k > facts.get("n_components", k):
        caption += (f" (more than the {facts['n_components']} components the stage keeps, "
                    "pca.n_components)")
    caption += (f"; the pca stage's own error map (pca_recon_error in its group) uses k = "
                f"{error_k} (pca.error_k)." if error_k is not None else ".")
    if used is not None:
        caption += (f" The comparisons below (reconstruction error, the PCA-score phase map) use "
                    f"k = {used} instead: the autoencoder's latent size (train.latent_dim), so "
                    f"both methods describe each pixel with {used} numbers.")
    add("scree", "PCA scree", fig, caption)


def _errors(add, plt, pca, train, enc, an, cl, timings) -> None:
    if enc is None or "pca_recon_error" not in enc:
        return
    (err, step), (perr, _) = _view(enc["recon_error"]), _view(enc["pca_recon_error"])
    mean_err, mean_perr = _exact(enc["recon_error"].mean(), enc["pca_recon_error"].mean())
    fig, axes = plt.subplots(1, 3, figsize=(15.5, 4), layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1, 0.9], "wspace": 0.08})
    lo = np.nanpercentile(np.concatenate([err.ravel(), perr.ravel()]), 1)
    hi = np.nanpercentile(np.concatenate([err.ravel(), perr.ravel()]), 99.5)
    metric = {"poisson": "chi-square per feature", "mse": "mean squared residual"}.get(
        enc.attrs["encode"].get("error"), "reconstruction error")
    k_lat = latent_dim(enc)
    for ax, v, t, m in ((axes[0], err, "autoencoder", mean_err), (axes[1], perr, "PCA", mean_perr)):
        im = _draw_map(ax, enc["recon_error"], v, vmin=lo, vmax=hi, cmap="magma")
        ax.set_title(f"{t} error, k = {k_lat} (mean {m:.3g})")
        fig.colorbar(im, ax=ax, shrink=0.8, label=metric)
    logx = lo > 0 and hi / lo > 20  # a log axis only for a wide range (its ticks crowd)
    bins = np.geomspace(lo, hi, 60) if logx else np.linspace(lo, hi, 60)
    axes[2].hist(perr.ravel()[np.isfinite(perr.ravel())], bins=bins, alpha=0.6, label="PCA")
    axes[2].hist(err.ravel()[np.isfinite(err.ravel())], bins=bins, alpha=0.6, label="autoencoder")
    if logx:
        axes[2].set_xscale("log")
    axes[2].set(xlabel=metric, ylabel="pixels", title="error histogram")
    axes[2].legend()
    add("errors", f"Reconstruction error: autoencoder (latent size {k_lat}) and PCA "
        f"({k_lat} components)", fig, enc["recon_error"].attrs.get("long_name", "")
        + f"; colour scale shared, 1st to 99.5th percentile.{_shown(step)}")


def _training(train) -> dict | None:
    """What training did, in epochs counted from 1 (as the run's log counts them): run, planned,
    best (the weights kept), patience, and whether it stopped early."""
    if train is None:
        return None
    facts, config = train.attrs["train"], train.attrs["train"].get("config", {})
    run = int(train.sizes.get("epoch", 0))
    planned = int(config.get("epochs", run))
    best = facts.get("best_epoch")
    return {"run": run, "planned": planned, "patience": config.get("patience"),
            "best": int(best) + 1 if best is not None and best >= 0 else None,
            "early": run < planned, "loss": config.get("loss", "mse"), "trim": config.get("trim"),
            "resumed_from": facts.get("resumed_from")}


def _training_text(t: dict) -> str:
    best = (f"the weights of epoch {t['best']} (lowest validation loss) are used"
            if t["best"] else "no epoch improved the validation loss")
    if not t["early"] and t["best"] == t["run"] and t["run"] > 1:
        best += "; the validation loss was still falling: more epochs (train.epochs) may help"
    if t["early"]:
        return (f"stopped early at epoch {t['run']} of {t['planned']}: the validation loss had "
                f"not improved for {t['patience']} epochs (train.patience); {best}")
    return f"all {t['planned']} epochs; {best}"


def _loss(add, plt, pca, train, enc, an, cl, timings) -> None:
    t = _training(train)
    if t is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    epochs = np.arange(1, t["run"] + 1)
    ax.plot(epochs, train["train_loss"].values, ".-", label="train")
    ax.plot(epochs, train["val_loss"].values, ".-", label="validation")
    if t["best"]:
        ax.axvline(t["best"], color="C2", ls="--", label=f"best: epoch {t['best']} (weights used)")
    if t["early"]:
        ax.axvspan(t["run"] + 0.5, t["planned"] + 0.5, color="0.85",
                   label=f"not run: early stop at epoch {t['run']}")
    ax.set_xlim(0.5, max(t["planned"], t["run"]) + 0.5)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ylabel = {"mse": "mean squared error (standardised)",
              "poisson": "Poisson negative log-likelihood"}.get(t["loss"], t["loss"])
    ax.set(xlabel="epoch", ylabel=ylabel, title=f"training: {t['run']} of {t['planned']} epochs",
           yscale="log")
    ax.legend(fontsize=8)
    caption = "Training " + _training_text(t) + "."
    if t["trim"]:
        caption += (f" The {t['trim']:.0%} largest losses of each epoch are left out of "
                    "training (train.trim).")
    if t["resumed_from"] is not None:
        caption += f" Resumed from the checkpoint of epoch {t['resumed_from'] + 1}."
    add("loss", "Loss curves", fig, caption)


CHOSEN_BY = {"elbow": "the elbow of the k-means inertia", "silhouette": "the highest silhouette",
             "bic": "the lowest BIC of a Gaussian mixture"}


def _k_choice_text(cl) -> str:
    """How K was chosen, in words: the criterion and the range swept, or fixed."""
    summary = cl.attrs["phase"]
    k, chosen_by = int(summary["n_clusters"]), summary["chosen_by"]
    if chosen_by == "fixed":
        return f"K = {k}, fixed in the workflow (cluster.n_clusters)"
    swept = ""
    if "k_candidate" in cl.coords and cl.sizes["k_candidate"]:
        kk = cl["k_candidate"].values
        swept = f" over K = {int(kk.min())}-{int(kk.max())} (cluster.k_range)"
    islands = summary.get("islands") or 0
    if chosen_by in CHOSEN_BY:
        text = f"K = {k - islands} by {CHOSEN_BY[chosen_by]}{swept}"
        if islands:
            text += (f", and {islands} distinct minor population(s) made phases of their own: "
                     f"K = {k}")
        return text
    return f"K = {k}: {chosen_by}"


def _steps_text(pre) -> str:
    """The preprocessing steps in a line: ``bin (factor 2); centre (method com); ...``."""
    steps = pre.attrs.get("preprocess", {}).get("steps", []) if pre is not None else []
    return "; ".join(st.get("step", "?") + (" (" + ", ".join(
        f"{k} {v}" for k, v in st.items() if k != "step" and v is not None) + ")"
        if any(k != "step" and v is not None for k, v in st.items()) else "") for st in steps)


def _axis_label(arr, dim) -> str:
    units = _axis(arr, dim)[1]
    name = arr[dim].attrs.get("long_name", dim) if dim in arr.coords else dim
    return f"{name} ({units})" if units else f"{name} (channel)"


def _phases(add, plt, pca, train, enc, an, cl, timings, verdict=None, pre=None) -> None:
    if cl is None:
        return
    phase, step = _view(cl["phase"])
    k = int(cl.attrs["phase"]["n_clusters"])
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    fractions = cl["phase_fraction"].values[:k]
    minor = set(cl.attrs["phase"].get("minor_phases", []))
    names = [f"phase {i}: {f:.1%}" + (" (minor)" if i in minor else "")
             for i, f in enumerate(fractions)]
    patches = [plt.Rectangle((0, 0), 1, 1, color=cmap(i % cmap.N)) for i in range(k)]
    flags = an["anomaly"] if an is not None else None
    if enc is not None:
        z = _view(enc["latent"], points=MAX_POINTS)[0].reshape(-1, latent_dim(enc))
        p = _view(cl["phase"], points=MAX_POINTS)[0].ravel()
        f = (_view(flags, points=MAX_POINTS)[0].ravel().astype(bool) if flags is not None
             else np.zeros(len(p), bool))
        ok = np.isfinite(z).all(1) & (p >= 0)
        z, p, f = z[ok], p[ok], f[ok]
        if z.shape[1] > 2:  # the plane of the codes' two main axes
            c = z - z.mean(0)
            z = c @ np.linalg.svd(c, full_matrices=False)[2][:2].T
        fig, ax = plt.subplots(figsize=(7.5, 4.6), layout="constrained")
        ax.scatter(z[:, 0], z[:, 1], c=p, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, s=2, alpha=0.5,
                   rasterized=True)
        handles, labels = list(patches), list(names)
        if f.any():
            ax.scatter(z[f, 0], z[f, 1], marker="x", color="k", s=8, lw=0.6)
            handles.append(plt.Line2D([], [], marker="x", color="k", ls="none"))
            labels.append(f"flagged anomalous ({f.sum()} shown)")
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8,
                  title="phase: share of pixels", title_fontsize=8)
        ax.set(title="latent codes by phase", xlabel="latent principal axis 1",
               ylabel="latent principal axis 2")
        dims = latent_dim(enc)
        add("latent", "Latent space", fig, f"{len(z)} sampled pixels, "
            + (f"their {dims}-D codes projected on the two principal axes of the codes"
               if dims > 2 else "their codes") + "; colour: the phase of the autoencoder codes"
            + ("; black crosses: pixels flagged anomalous" if f.any() else ""))
    if "k_candidate" in cl.coords:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), layout="constrained")
        kk = cl["k_candidate"].values
        summary = cl.attrs["phase"]
        chosen_by, islands = summary["chosen_by"], summary.get("islands") or 0
        swept = k - islands  # the sweep's K; distinct minor populations are phases besides it
        ylabels = {"inertia": "within-phase sum of squares", "silhouette": "mean silhouette",
                   "bic": "BIC (Gaussian mixture)"}
        for ax, name in zip(axes, ("inertia", "silhouette", "bic")):
            ax.plot(kk, cl[f"k_{name}"].values, "o-")
            if name == chosen_by or (name == "inertia" and chosen_by == "elbow"):
                ax.axvline(swept, color="C3", ls="--", label=f"chosen: K = {swept}")
                ax.legend(fontsize=8)
            ax.set(xlabel="K", ylabel=ylabels[name],
                   title=name + {"inertia": " (elbow)", "silhouette": " (highest)",
                                 "bic": " (lowest)"}[name])
        caption = _k_choice_text(cl)
        sil, bic = cl["k_silhouette"].values, cl["k_bic"].values
        picks = {}
        if np.isfinite(sil).any():
            picks["silhouette"] = int(kk[np.nanargmax(sil)])
        if np.isfinite(bic).any():
            picks["BIC"] = int(kk[np.nanargmin(bic)])
        others = [f"{name} K = {pick}" for name, pick in picks.items()
                  if pick != swept and name.lower() != chosen_by]
        if others and chosen_by in CHOSEN_BY:
            caption += (f"; the others would choose {' and '.join(others)} (cluster.k_choice "
                        "picks the criterion)")
        if islands and summary.get("minor_populations"):
            caption += " (the curves: on the pixels outside the small populations)"
        add("kchoice", "Choice of K", fig, caption)
    maps = [("phase", "autoencoder codes")]
    if "pca_phase" in cl:
        maps.insert(1 if verdict is None else 0, ("pca_phase", "PCA scores"))
    shown_flags = _view(flags)[0].astype(bool) if flags is not None else None
    (flagged_share,) = _exact(flags.mean()) if flags is not None else (0.0,)
    fig, axes = plt.subplots(1, len(maps), figsize=(6.8 * len(maps), 4.8), squeeze=False,
                             layout="constrained")
    outlined = False
    for ax, (name, what) in zip(axes[0], maps):
        n = int(cl.attrs.get(name, {}).get("n_clusters", k))
        _draw_map(ax, cl[name], np.ma.masked_less(_view(cl[name])[0], 0), cmap=cmap, vmin=-0.5,
                  vmax=cmap.N - 0.5, interpolation="nearest")
        outlined = _overlay_flags(ax, cl[name], shown_flags, colour="black", width=0.9)
        handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i % cmap.N)) for i in range(n)]
        labels = [f"phase {i}: {f:.1%}" for i, f in enumerate(cl[f"{name}_fraction"].values[:n])]
        if outlined:
            handles.append(plt.Line2D([], [], color="black", lw=1))
            labels.append(f"flagged anomalous: {flagged_share:.1%}")
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
        ax.set_title(f"phase map of the {what}")
    first = ("PCA scores first: " + verdict + ". ") if verdict else ""
    overlay = ("Black outlines: pixels flagged anomalous (anomaly stage), drawn over both maps. "
               if outlined else "")
    blank = ("Blank pixels: masked in preprocessing (not finite). " if (phase < 0).any() else "")
    add("phases", "Phase map", fig, first + overlay + blank + _shown(step).strip())
    mean = cl["phase_mean_signal"]
    flagged = cl.get("anomaly_mean_signal")
    n_flagged = int(flagged.attrs.get("pixels", 0)) if flagged is not None else 0
    ylabel = "mean preprocessed signal (a.u.)"
    if mean.ndim == 2:
        fig, ax = plt.subplots(figsize=(9, 3.9), layout="constrained")
        axis = mean.dims[1]
        xs = _axis(mean, axis)[0]
        for i in range(k):
            ax.plot(xs, mean.values[i], color=cmap(i), label=names[i])
        if n_flagged:
            ax.plot(xs, flagged.values, "k--", label=f"flagged anomalous: {n_flagged} pixels")
        ax.set(xlabel=_axis_label(mean, axis), ylabel=ylabel, title="phase mean spectra")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    elif mean.dims[1:] == ("radius", "harmonic"):  # polar features: profiles along the radius
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.9), layout="constrained", sharex=True)
        radius = _axis(mean, "radius")[0]
        series = [(mean.values[i], names[i], cmap(i), "-") for i in range(k)]
        if n_flagged:
            series.append((flagged.values, f"flagged anomalous: {n_flagged} pixels", "k", "--"))
        for values, name, colour, style in series:
            axes[0].plot(radius, values[:, 0], style, color=colour, label=name)
            axes[1].plot(radius, values[:, 1:].max(axis=1), style, color=colour, label=name)
        xlabel = _axis_label(mean, "radius")
        axes[0].set(title="azimuthal mean (harmonic 0): rings", ylabel=ylabel, xlabel=xlabel)
        axes[1].set(title="strongest angular harmonic (m >= 1): spots", xlabel=xlabel,
                    ylabel="harmonic magnitude (a.u.)")
        axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        panels = [(mean.values[i], names[i]) for i in range(k)]
        if n_flagged:
            panels.append((flagged.values, f"flagged: {n_flagged} px"))
        dims = mean.dims[1:]
        finite = np.concatenate([im[np.isfinite(im)].ravel() for im, _ in panels])
        lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0, 1))
        cols = min(len(panels), 4)
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1.4, 3.3 * rows),
                                 squeeze=False, sharex=True, sharey=True, layout="constrained")
        extent = _extent(mean, dims)
        for j, ax in enumerate(axes.ravel()):
            if j >= len(panels):
                ax.axis("off")
                continue
            image, title = panels[j]
            im = ax.imshow(image, cmap="inferno", vmin=lo, vmax=hi, extent=extent,
                           interpolation="nearest")
            ax.set_title(title, fontsize=9)
            if j % cols == 0:
                _space_axes(ax, mean, dims, bar=False)
                if j + cols < len(panels):  # the x label once, under the bottom row
                    ax.set_xlabel("")
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9, label=ylabel)
    add("phase_mean", "Phase mean signals", fig, "Exact means over all pixels of each phase"
        + (" and of the pixels flagged anomalous" if n_flagged else "")
        + "; minor: under cluster.min_phase_fraction of the pixels. The signal is the "
        "preprocessed features (arbitrary units), after: " + (_steps_text(pre) or "no step")
        + ".")


def _traverse(add, plt, pca, train, enc, an, cl, timings, steps: int = 7,
              max_dims: int = 8) -> None:
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
    polar = mean.dims[1:] == ("radius", "harmonic")  # drawn as its rings: the azimuthal mean
    if mean.ndim == 2 or polar:
        if polar:
            signals = signals[..., 0]
        axis = mean.dims[1]
        xs = _axis(mean, axis)[0]
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
            ax.set_xlabel(_axis_label(mean, axis))
        for ax in axes[:, 0]:
            ax.set_ylabel("decoded azimuthal mean (a.u.)" if polar else "decoded signal (a.u.)")
    else:
        fig, axes = plt.subplots(dims, steps, figsize=(1.3 * steps + 1, 1.3 * dims),
                                 squeeze=False, layout="constrained")
        lo, hi = np.percentile(signals[np.isfinite(signals)], [0.5, 99.5])
        for j in range(dims):
            for i in range(steps):
                im = axes[j, i].imshow(signals[j, i], cmap="inferno", vmin=lo, vmax=hi,
                                       extent=_extent(mean, mean.dims[1:]))
                axes[j, i].set_xticks([])
                axes[j, i].set_yticks([])
            axes[j, 0].set_ylabel(f"z{j}", fontsize=8)
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="decoded signal (a.u.)")
    kind = "variational autoencoder" if spec.config.get("variational") else "autoencoder"
    add("traverse", "Latent traverse", fig,
        f"the {kind}'s decoded signal as one latent coordinate goes from the 5th to the 95th "
        "percentile of the codes (dark to light), the others at their median"
        + ("; of the polar features, harmonic 0 (the rings) along the radius" if polar else "")
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
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    im = _draw_map(ax, pre["polar_orientation"], np.ma.masked_where(symmetry != m, angle),
                   cmap="twilight", vmin=0, vmax=360 / m, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="in-plane angle (degree)")
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
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    s = score[np.isfinite(score)]
    # a robust range: low scores are all normal, and a few far below the rest (a vacuum
    # region's codes, 10 % of a 4D-STEM scan at -270) flattened the map into one colour
    lo, q1, q2, q3, hi = (np.percentile(s, [0.5, 25, 50, 75, 99.9]) if s.size else (0, 0, 0, 1, 1))
    lo, hi = min(max(lo, q2 - 4 * (q3 - q1)), thr), max(hi, thr)
    below, above = int((s < lo).sum()), int((s > hi).sum())
    im = _draw_map(axes[0], flagged, score, cmap="viridis", vmin=lo, vmax=hi)
    label = an["anomaly_score"].attrs.get("long_name", "anomaly score")
    if _overlay_flags(axes[0], flagged, shown_flags):
        axes[0].set_title(f"anomaly score; {fraction:.2%} flagged (outlined in red)")
    else:
        axes[0].set_title(f"anomaly score; {fraction:.2%} flagged")
    fig.colorbar(im, ax=axes[0], shrink=0.8, label=label,
                 extend={(True, True): "both", (True, False): "min", (False, True): "max"}.get(
                     (below > 0, above > 0), "neither"))
    axes[1].hist(np.clip(s, lo, hi), bins=100, range=(lo, hi) if hi > lo else None, log=True)
    axes[1].axvline(thr, color="C3", ls="--", label=f"threshold {thr:.3g}: above it flagged")
    axes[1].set(xlabel=label, ylabel="pixels", title=f"{flagged.attrs['method']} score, "
                f"{flagged.attrs['calibration']} calibration")
    axes[1].legend(fontsize=8)
    clipped = (f"Colour scale and histogram span {lo:.3g} to {hi:.3g} (the bulk of the scores "
               f"and the threshold); {below} pixels below and {above} above are drawn at its "
               "ends. " if below or above else "")
    add("anomaly", "Anomalies", fig, clipped + _shown(step).strip())


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _timings(add, plt, pca, train, enc, an, cl, timings) -> None:
    if not timings:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3))
    names = list(timings)
    ax.barh(names, [timings[n] for n in names])
    ax.invert_yaxis()
    ax.set(xlabel="seconds", title=f"time per stage (total {_duration(sum(timings.values()))})")
    add("timings", "Timings", fig, ", ".join(f"{n} {t:.1f} s" for n, t in timings.items()))


def _open_scan(pre):
    """The scan store the run read (lazily; only its attrs and coordinates are used), or None
    where it has moved."""
    path = pre.attrs.get("scan_store") if pre is not None else None
    if not path:
        return None
    try:
        from emscale.store import open_scan

        return open_scan(path, validate=False)
    except Exception as exc:  # the summary then says less, from the results store alone
        log.info("report: scan store %s not opened (%s)", path, exc)
        return None


KIND_NAMES = {"eels": "EELS spectrum image", "eds": "EDS spectrum image",
              "diffraction": "4D-STEM scan (a diffraction pattern per pixel)"}


def _kind_text(scan, pre) -> str:
    attrs = scan.attrs if scan is not None else {}
    kind = attrs.get("kind") or (pre.attrs.get("kind") if pre is not None else None)
    signal_type = attrs.get("signal_type")
    generator = (attrs.get("generator") or {}).get("name")
    if kind == "diffraction":
        return KIND_NAMES["diffraction"]
    if signal_type:
        return f"{signal_type} spectrum image"
    return KIND_NAMES.get(generator, "spectrum image" if kind == "spectrum" else str(kind))


def _source_text(results, scan, pre) -> str:
    prov = results.attrs.get("provenance", {})
    given = (prov.get("input") or {}).get("path")
    attrs = scan.attrs if scan is not None else {}
    source = attrs.get("source") or (pre.attrs.get("source") if pre is not None else {}) or {}
    seed = (attrs.get("generator") or {}).get("seed")
    synthetic = ""
    if source.get("generator"):
        synthetic = f"synthetic: {source['generator']}" + (f", seed {seed}" if seed is not None
                                                             else "")
    path = str(given or source.get("path") or "")
    text = (path + (f" ({synthetic})" if synthetic else "")) if path else synthetic or "unknown"
    store = pre.attrs.get("scan_store") if pre is not None else None
    same = store and path and Path(store).resolve() == Path(path).resolve()
    return text + (f"; scan store {store}" if store and not same else "")


def _axes_text(arr, dims, what: str) -> str:
    """``ny x nx WHAT``, with the extent and step in the calibrated units, or "uncalibrated"."""
    sizes = [arr.sizes[d] for d in dims]
    text = " x ".join(str(n) for n in sizes) + f" {what}"
    units = _calibrated(arr, dims) if len(dims) == 2 else _axis(arr, dims[0])[1]
    if units is None:
        return text + " (no calibration: axes in pixels)"
    values = [_axis(arr, d)[0] for d in dims]
    steps = [abs(_step(v)) for v in values]
    if len(dims) == 1:
        v = values[0]
        return text + f", {v[0]:.4g}-{v[-1]:.4g} {units} ({steps[0]:.3g} {units} per channel)"
    span = " x ".join(f"{n * st:.4g}" for n, st in zip(sizes, steps))
    per = (f"{steps[0]:.3g} {units}" if np.isclose(steps[0], steps[1])
           else " x ".join(f"{st:.3g}" for st in steps) + f" {units}")
    return text + f", {span} {units} ({per} per pixel)"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000


def _size_text(scan, cl, an) -> str:
    nav = scan if scan is not None else (cl if cl is not None else an)
    if nav is None:
        return "unknown"
    ref = nav["signal"] if scan is not None and "signal" in scan else next(
        nav[v] for v in nav.data_vars if nav[v].dims[:2] == ("y", "x"))
    text = _axes_text(ref, ("y", "x"), "pixels")
    if scan is not None and "signal" in scan:
        signal = scan["signal"]
        dims = signal.dims[2:]
        what = "channels per pixel" if len(dims) == 1 else "detector pixels per pattern"
        text += "; " + _axes_text(signal, dims, what)
        text += f"; {_bytes(signal.nbytes)} of {signal.dtype} (uncompressed)"
    return text


def _summary_html(results, scan, pre, train, enc, an, cl, timings, verdict) -> str:
    """The page's first table: what was scanned and what the run found, in words."""
    rows = [("Scan", _source_text(results, scan, pre)), ("Kind", _kind_text(scan, pre)),
            ("Size", _size_text(scan, cl, an))]
    if pre is not None:
        text = _steps_text(pre) or "none"
        masked = (pre.attrs.get("value_counts") or {}).get("invalid_pixels")
        if masked:
            text += f"; {masked} pixels masked (not finite)"
        rows.append(("Preprocessing", text))
    if cl is not None:
        k = int(cl.attrs["phase"]["n_clusters"])
        fractions = cl["phase_fraction"].values[:k]
        rows.append(("Phases", _k_choice_text(cl) + "; shares: "
                     + ", ".join(f"phase {i} {f:.1%}" for i, f in enumerate(fractions))))
        minor = cl.attrs["phase"].get("minor_phases", [])
        threshold = (results.attrs.get("provenance", {}).get("workflow", {}).get("cluster", {})
                     .get("min_phase_fraction"))
        rule = (f" (a phase under {threshold:.0%} of the pixels: cluster.min_phase_fraction)"
                if threshold is not None else "")
        rows.append(("Minor phases", ", ".join(f"phase {i} ({fractions[i]:.2%})" for i in minor)
                     + rule if minor else "none" + rule))
    if an is not None:
        (share,) = _exact(an["anomaly"].mean())
        a = an["anomaly"].attrs
        target = (an.attrs.get("anomaly") or {}).get("target_false_alarm_rate")
        rows.append(("Anomalies", f"{share:.2%} of the pixels flagged ({a.get('method')} score "
                     f"above {float(a['threshold']):.3g}, {a.get('calibration')} calibration"
                     + (f" for a {target:.1%} false-alarm rate" if target else "") + ")"))
    t = _training(train)
    if t is not None:
        config = train.attrs["train"].get("config", {})
        text = (f"{config.get('model', '?')}, latent size {config.get('latent_dim', '?')}, "
                f"{_training_text(t)}")
        if verdict:
            text += f"; {verdict}: the PCA map is shown first"
        rows.append(("Autoencoder", text))
    if timings:
        names = list(timings)
        rows.append(("Time", f"{_duration(sum(timings.values()))}: the stages {names[0]} to "
                     f"{names[-1]} (each as long as the run that wrote it took; the report not "
                     "included)" if len(names) > 1 else f"{_duration(timings[names[0]])}"))
    if cl is not None:
        n = sum(len(cl.attrs.get(key, {}).get("warnings", [])) for key in ("phase", "pca_phase"))
        n += verdict is not None  # (the warnings' list starts with it)
        rows.append(("Warnings", f"{n}, listed below" if n else "none"))
    body = "".join(f"<tr><th>{html.escape(h)}</th><td>{html.escape(str(v))}</td></tr>"
                   for h, v in rows)
    return f"<section class='summary'><h2>Summary</h2><table>{body}</table></section>"


CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse}th,td{text-align:left;vertical-align:top;padding:.3em .8em;
border-bottom:1px solid #e4e4e4}.summary th{white-space:nowrap;color:#555;font-weight:600}
.warnings{background:#fff6e0;border-left:4px solid #e0a000;padding:.2em 1em}
section p{max-width:70em}nav a{margin-right:1em}
pre{background:#f4f4f4;padding:1em;overflow:auto;font-size:80%}"""


def write_report(results, out_dir: Path, timings: dict[str, float] | None = None) -> Path:
    """Write ``out_dir/index.html`` and its PNGs from the stages of ``results``."""
    plt = _figure()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pca, train = _stage(results, "pca"), _stage(results, "train")
    enc, an, cl = _stage(results, "encode"), _stage(results, "anomaly"), _stage(results, "cluster")
    pre = _stage(results, "preprocess")
    sections: list[tuple[str, str, str, str]] = []  # (name, title, png base64, caption)

    def add(name, title, fig, caption=""):
        sections.append((name, title, _save(fig, out_dir / f"{name}.png"), caption))

    from emscale.evaluate import truth_scores

    scores = truth_scores(results)
    verdict = _autoencoder_verdict(scores, enc) if cl is not None else None
    for section in (_scree, _errors, _loss, partial(_phases, verdict=verdict, pre=pre),
                    _traverse, partial(_orientation, pre=pre), _anomalies, _timings):
        section(add, plt, pca, train, enc, an, cl, timings)
    summary = _summary_html(results, _open_scan(pre), pre, train, enc, an, cl, timings, verdict)
    head = summary + _warnings_html(cl, verdict) + _truth_table(scores)
    prov = results.attrs.get("provenance", {})
    contents = "".join(f"<a href='#{n}'>{html.escape(t)}</a>" for n, t, _, _ in sections)
    body = head + f"<nav>{contents}<a href='#provenance'>Provenance</a></nav>" + "\n".join(
        f"<section id='{n}'><h2>{html.escape(t)}</h2><img src='data:image/png;base64,{b64}'>"
        f"<p>{html.escape(c)}</p></section>" for n, t, b64, c in sections)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>emscale report</title>
<style>{CSS}</style></head><body>
<h1>emscale report</h1><p>results: {html.escape(str(results.path))}</p>
{body}
<h2 id='provenance'>Provenance</h2><details><summary>the workflow as run, the input, versions,
host, cluster</summary><pre>{html.escape(json.dumps(prov, indent=2, default=str))}</pre></details>
</body></html>"""
    index = out_dir / "index.html"
    index.write_text(page)
    log.info("report written to %s", index)
    return index
