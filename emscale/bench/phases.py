"""``emscale bench phases``: phase map and anomaly map of a synthetic EELS scan, with figures.

The whole pipeline as ``emscale run`` runs it (the runner and the stage registry), on one
LocalCluster (``workers`` processes x 1 thread, emscale's worker environment). Two synthetic EELS
scans of the same material are written as scan stores: a reference without anomalies (declared
normal, ``anomaly.reference``: the lecture's protocol, train on normal data) and the scan, with
anomalies (``label`` ground truth: 4 phases, -1 for contamination and beam damage). The workflow:
``preprocess`` (unit-sum normalisation, both scans), ``pca`` (gram), ``train`` (MLP, on the
reference, on one worker), ``encode`` (latent, chi-square reconstruction error, PCA error at the
same k), ``anomaly`` (the reference's 99th percentile: ``calibration: reference``) and ``cluster``
(k-means with K chosen by the inertia's elbow, on the latent codes and on the PCA scores, fitted on
the pixels not flagged anomalous). Beside the run, on its outputs: the threshold calibrated
robustly on the scan itself (1 % false-alarm rate; ``AnomalyScorer``), and k-means at the true K.

Then the same scan with no reference and no region declared normal (trained on the scan
itself, anomalies calibrated robustly at 1 % false alarms), as most facility scans arrive, and a
uniform specimen: Poisson counts around one pure phase's clean spectrum, where the right answer
is "no phase structure".

Figures:
- per ground-truth class (each phase, each anomaly kind; ``emscale.evaluate.class_recall``): the
  share of its pixels flagged, in a phase of its own, or either, for both runs;
- ARI of ``phase`` (and ``pca_phase``) against ``label`` over the labelled pixels;
- anomaly recall (flagged among label -1) and false-alarm rate (flagged among the others);
- encode + score throughput against the read+decompress floor of the same ``features`` store on
  the same workers (a dask sum, run twice: the first warms the page cache), in GB/s of float32
  features, and the peak resident memory (VmHWM, reset before) of the busiest worker meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emscale.bench.memory import peak_bytes, reset_peak
from emscale.config import json_safe
from emscale.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class PhaseBench:
    kind: str
    shape: list
    channels: int | None
    pattern: list | None
    latent_dim: int
    epochs: int
    workers: int
    features_gb: float
    figures: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        f, s = self.figures, self.seconds
        signal = (f"EELS {self.shape[0]} x {self.shape[1]} x {self.channels}" if self.kind == "eels"
                  else f"4D-STEM {self.shape[0]} x {self.shape[1]} x {self.pattern[0]} x "
                       f"{self.pattern[1]}")
        lines = [f"phase bench: synthetic {signal} "
                 f"with anomalies, latent k={self.latent_dim}, {self.epochs} epochs, "
                 f"{self.workers} workers x 1 thread, features {self.features_gb:.3f} GB float32",
                 f"{'figure':<44}{'value':>10}",
                 f"{'ARI phase (autoencoder latent) vs label':<44}{f['ari']:>10.3f}",
                 f"{'ARI pca_phase (PCA scores, same k) vs label':<44}{f['pca_ari']:>10.3f}",
                 f"{'K chosen (' + f['k_chosen_by'] + ')':<44}{f['n_clusters']:>10d}",
                 f"{'ARI phase, pure pixels (majority >= 0.9)':<44}{f['ari_pure_pixels']:>10.3f}",
                 f"{'ARI pca_phase, pure pixels':<44}{f['pca_ari_pure_pixels']:>10.3f}",
                 f"{'pure pixels / labelled pixels':<44}{f['pure_pixel_fraction']:>10.3f}",
                 f"{'ARI at the true K (' + str(f['true_k']) + ')':<44}{f['ari_at_true_k']:>10.3f}",
                 f"{'anomaly recall (robust threshold)':<44}{f['anomaly_recall']:>10.4f}",
                 f"{'anomaly false alarms (robust threshold)':<44}"
                 f"{f['anomaly_false_alarm_rate']:>10.4f}",
                 f"{'anomaly recall (reference p99)':<44}"
                 f"{f['anomaly_recall_reference_threshold']:>10.4f}",
                 f"{'anomaly false alarms (reference p99)':<44}"
                 f"{f['anomaly_false_alarm_rate_reference_threshold']:>10.4f}",
                 f"{'read floor GB/s':<44}{f['floor_gb_per_s']:>10.3f}",
                 f"{'encode + score GB/s':<44}{f['encode_score_gb_per_s']:>10.3f}",
                 f"{'encode + score / floor':<44}{f['encode_score_fraction_of_floor']:>10.1%}",
                 f"{'encode + score peak worker memory GB':<44}"
                 f"{f['encode_score_peak_worker_gb']:>10.3f}",
                 "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items())]
        for run in ("with_reference", "without_reference"):
            r = f.get(run)
            if not r:
                continue
            lines.append(f"{run.replace('_', ' ')}: K = {r['n_clusters']} ({r['k_chosen_by']}), "
                         f"ARI {r['ari']:.3f} (PCA {r['pca_ari']:.3f}), false alarms "
                         f"{r['classes']['false_alarm_rate']:.2%}")
            lines.append(f"  {'class':<20}{'pixels':>9}{'flagged':>9}{'own phase':>11}{'either':>8}")
            for name, c in r["classes"]["classes"].items():
                lines.append(f"  {name:<20}{c['pixels']:>9d}{c['flagged']:>9.1%}"
                             f"{c['own_phase']:>11.1%}{c['either']:>8.1%}")
        if f.get("noise"):
            n = f["noise"]
            lines.append(f"uniform specimen (noise): K = {n['n_clusters']} ({n['k_chosen_by']}), "
                         f"{n['flagged']:.2%} flagged")
        return "\n".join(lines)


def _timed(seconds: dict, name: str, fn):
    t0 = time.perf_counter()
    out = fn()
    seconds[name] = time.perf_counter() - t0
    log.info("%s: %.1f s", name, seconds[name])
    return out


def _run_figures(results, truth, label) -> dict:
    """A run's phase and anomaly maps against the ground truth, per class."""
    from sklearn.metrics import adjusted_rand_score

    from emscale.evaluate import class_recall

    classes, names, n_phases = truth
    cl, an = results.open_stage("cluster"), results.open_stage("anomaly")
    phase, flagged = cl["phase"].values, an["anomaly"].values.astype(bool)
    normal = label >= 0
    return {
        "ari": float(adjusted_rand_score(label[normal], phase[normal])),
        "pca_ari": float(adjusted_rand_score(label[normal], cl["pca_phase"].values[normal])),
        "n_clusters": int(cl.attrs["phase"]["n_clusters"]),
        "k_chosen_by": cl.attrs["phase"]["chosen_by"],
        "warnings": list(cl.attrs["phase"].get("warnings", [])),
        "classes": class_recall(classes, names, n_phases, phase, flagged)}


def _noise_figures(scan_ds, purity, label, workflow, tmp: Path, seed: int,
                   side: int = 128) -> dict:
    """The no-reference workflow on a uniform specimen (one pure pixel's clean signal, Poisson
    counts): K and its verdict, and what is flagged (about the false-alarm rate is right)."""
    import xarray as xr

    from emscale.runner import Runner
    from emscale.store import write_scan
    from emscale.results import ResultsStore

    # EELS: phase 0; 4D-STEM: its most common phase (its phase 0 is vacuum, whose patterns
    # are nothing but the central disk, which the chain masks)
    phase = 0 if scan_ds.attrs["kind"] == "eels" else int(np.bincount(label[label >= 0]).argmax())
    candidates = np.argwhere((purity >= 0.99) & (label == phase))
    if not len(candidates):  # a small scan: the purest pixel of that phase
        candidates = [np.unravel_index(np.argmax(np.where(label == phase, purity, -1)),
                                       label.shape)]
    y, x = candidates[0]
    signal = scan_ds["clean"].isel(y=int(y), x=int(x)).values.astype(np.float64)
    counts = np.random.default_rng([seed, 16]).poisson(signal, (side, side, *signal.shape))
    sig_dims = scan_ds["signal"].dims[2:]
    ds = xr.Dataset({"signal": (("y", "x", *sig_dims), counts.astype(np.uint16))},
                    coords={d: scan_ds[d] for d in sig_dims if d in scan_ds.coords},
                    attrs={"kind": scan_ds.attrs["kind"]})
    write_scan(ds, tmp / "noise.zarr")
    wf = workflow.model_copy(update={"input": str(tmp / "noise.zarr"),
                                     "output": str(tmp / "noise")})
    result = Runner(wf, echo=lambda msg: log.info("%s", msg), progress=False,
                    report=False).run()
    results = ResultsStore(result.results)
    phase = results.stage_attrs("cluster")["phase"]
    flagged = results.open_stage("anomaly")["anomaly"].values
    return {"shape": [side, side, *signal.shape], "n_clusters": int(phase["n_clusters"]),
            "k_chosen_by": phase["chosen_by"], "warnings": list(phase.get("warnings", [])),
            "flagged": float(flagged.mean())}


def _import_torch() -> None:
    import torch  # noqa: F401


def _sections(kind: str, shape, latent_dim: int, epochs: int, max_train_pixels: int,
              pattern=(128, 128)) -> dict:
    """The workflow's sections of the bench: for EELS unit-sum spectra, an MLP and k-means with
    the elbow; for 4D-STEM those of the shipped ``workflows/4dstem-phase-mapping.yaml`` (bin 2,
    centre, the central disk masked, log, polar; an MLP with the PCA path, no trimmed loss;
    anomalies by the distance to the codes' mixture alone; k-means with the elbow), with the mask's
    radius from the generator's probe (its disk radius in binned pixels plus 1.5 for the edge)."""
    tile = max(8, min(shape) // 16)
    if kind == "eels":
        return {"preprocess": {"steps": [{"step": "normalize", "method": "sum"}]},
                "pca": {"n_components": max(16, latent_dim), "solver": "gram"},
                "train": {"latent_dim": latent_dim, "epochs": epochs, "batch_size": 256,
                          "tile": tile, "max_train_pixels": max_train_pixels},
                "cluster": {"method": "kmeans"}, "anomaly": {}}
    from emscale.synth.diffraction import DISK_FRACTION

    radius = round(DISK_FRACTION * min(pattern) / 2 + 1.5, 2)
    return {"preprocess": {"steps": [{"step": "bin", "factor": 2},
                                     {"step": "centre", "method": "com"},
                                     {"step": "beam_mask", "radius": radius},
                                     {"step": "scale", "method": "log"},
                                     {"step": "polar"}]},
            "pca": {"n_components": max(16, latent_dim), "solver": "gram"},
            "train": {"model": "mlp", "latent_dim": latent_dim, "widths": [256, 64],
                      "pca_path": True,
                      "epochs": epochs, "batch_size": 256, "objective": "denoise",
                      "noise": "gaussian", "tile": tile, "max_train_pixels": max_train_pixels,
                      "trim": 0},
            "cluster": {"method": "kmeans"},
            "anomaly": {"method": "mahalanobis", "density": "mixture"}}


def _synth(kind: str, shape, channels: int, pattern, anomaly: bool, seed: int):
    if kind == "eels":
        from emscale.synth.eels import synth_eels

        return synth_eels(tuple(shape), channels=channels, anomaly=anomaly, seed=seed)
    from emscale.synth.diffraction import synth_diffraction

    return synth_diffraction(tuple(shape), pattern=tuple(pattern), anomaly=anomaly, seed=seed)


def run_phase_bench(shape=(512, 512), channels=1024, latent_dim=None, epochs=20, workers=2,
                    seed=0, max_train_pixels=65536, workdir=None, kind: str = "eels",
                    pattern=(128, 128)) -> PhaseBench:
    """``kind``: ``eels`` (``channels`` energy channels, latent 4 by default) or ``4dstem``
    (``pattern`` detector pixels, the shipped 4D-STEM workflow's chain and models, latent 8)."""
    from distributed import Client
    from sklearn.metrics import adjusted_rand_score

    from emscale.dask_cluster import local_cluster
    from emscale.runner import Runner
    from emscale.stages.anomaly import AnomalyScorer
    from emscale.stages.cluster import PhaseClustering, phase_stage
    from emscale.evaluate import ground_truth_classes
    from emscale.store import open_scan, write_scan
    from emscale.synth import generator_from_attrs
    from emscale.workflow import validate_workflow

    if kind not in ("eels", "4dstem"):
        raise ConfigError(f"kind: 'eels' or '4dstem', got {kind!r}")
    latent_dim = latent_dim or (4 if kind == "eels" else 8)
    seconds: dict = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, \
            local_cluster(n_workers=workers, threads_per_worker=1) as cluster, \
            Client(cluster) as client:
        paths = {}
        # the reference: a scan of the same material without anomalies, declared normal
        for name, scan_seed, anomaly in (("reference", seed + 1, False), ("scan", seed, True)):
            paths[name] = Path(tmp) / f"{name}.zarr"
            _timed(seconds, f"synth_{name}", lambda: write_scan(
                _synth(kind, shape, channels, pattern, anomaly, scan_seed), paths[name]))
        sections = _sections(kind, shape, latent_dim, epochs, max_train_pixels, pattern)
        wf = validate_workflow({
            "input": str(paths["scan"]), "output": str(Path(tmp) / "run"), "seed": seed,
            **sections,
            "anomaly": {**sections["anomaly"], "reference": str(paths["reference"]),
                        "calibration": "reference", "quantile": 0.99}}, source="bench phases")

        def run(until=None):
            # (no report: 5-15 s a run for pictures that are not the bench's figures)
            result = Runner(wf, echo=lambda msg: log.info("%s", msg), until=until,
                            progress=False, report=False).run()
            seconds.update({k.replace(" (reference)", "_reference"): v
                            for k, v in result.seconds.items()})
            return result

        result = run(until="train")
        from emscale.results import ResultsStore

        results = ResultsStore(result.results)
        features = results.open_stage("preprocess")
        feats = features["features"].data
        gb = feats.size * 4 / 1e9
        for _ in range(2):  # the first warms the page cache
            _timed(seconds, "floor", lambda: feats.sum().compute())
        client.run(_import_torch)  # steady state: not the workers' first import of torch
        client.run(reset_peak)
        run(until="anomaly")  # encode, and anomaly (which encodes the reference too)
        peak = max(client.run(peak_bytes).values())
        run()  # cluster
        encoded, scored = results.open_stage("encode"), results.open_stage("anomaly")
        phases, train = results.open_stage("cluster"), results.open_stage("train")
        robust = AnomalyScorer(method=wf.anomaly.method, density=wf.anomaly.density,
                               calibration="robust", false_alarm_rate=0.01)
        _timed(seconds, "robust_fit", lambda: robust.fit(encoded))
        by_robust = robust.score(encoded)["anomaly"].values
        label = features["label"].values
        normal = label >= 0
        true_k = int(label.max()) + 1
        fixed = phase_stage(encoded["latent"], features,
                            PhaseClustering(wf.cluster.method, n_clusters=true_k, seed=seed),
                            exclude=scored["anomaly"])
        flagged = scored["anomaly"].values
        phase, pca_phase = phases["phase"].values, phases["pca_phase"].values
        # the reference's encoding is part of the anomaly stage, not of this scan's throughput
        score_s = seconds["encode"] + seconds["anomaly"] - seconds.get("encode_reference", 0.0)

        def ari(labels, where=normal):
            return float(adjusted_rand_score(label[where], labels[where]))

        # the label of a boundary pixel is its majority phase: ARI over the pure pixels too
        scan_ds = open_scan(paths["scan"])
        gen = generator_from_attrs(scan_ds.attrs)
        purity = np.concatenate([gen.purity_block(y, min(y + 64, shape[0]), 0, shape[1])
                                 for y in range(0, shape[0], 64)])
        pure = normal & (purity >= 0.9)

        def rate(mask, where):
            return float(mask[where].mean()) if where.any() else float("nan")

        figures = {
            "ari": ari(phase),
            "pca_ari": ari(pca_phase),
            "ari_at_true_k": ari(fixed["phase"].values),
            "ari_pure_pixels": ari(phase, pure),
            "pca_ari_pure_pixels": ari(pca_phase, pure),
            "pure_pixel_fraction": float(pure.sum() / normal.sum()),
            "true_k": true_k,
            "n_clusters": int(phases.attrs["phase"]["n_clusters"]),
            "k_chosen_by": phases.attrs["phase"]["chosen_by"],
            "anomaly_recall": rate(by_robust, ~normal),
            "anomaly_false_alarm_rate": rate(by_robust, normal),
            "anomaly_recall_reference_threshold": rate(flagged, ~normal),
            "anomaly_false_alarm_rate_reference_threshold": rate(flagged, normal),
            "floor_gb_per_s": gb / seconds["floor"],
            "encode_score_gb_per_s": gb / score_s,
            "encode_score_peak_worker_gb": peak / 1e9,
        }
        figures["encode_score_fraction_of_floor"] = (figures["encode_score_gb_per_s"]
                                                     / figures["floor_gb_per_s"])
        err = encoded["recon_error"].values
        pca_err = encoded["pca_recon_error"].values
        details = {
            "recon_error_normal_mean": float(np.nanmean(err[normal])),
            "recon_error_anomaly_mean": float(np.nanmean(err[~normal])) if (~normal).any() else None,
            "pca_recon_error_normal_mean": float(np.nanmean(pca_err[normal])),
            "pca_recon_error_anomaly_mean": (float(np.nanmean(pca_err[~normal]))
                                             if (~normal).any() else None),
            "error_metric": encoded.attrs["encode"]["error"],
            "k_table": {name: phases[f"k_{name}"].values.tolist()
                        for name in ("inertia", "silhouette", "bic")},
            "k_candidates": phases["k_candidate"].values.tolist(),
            "anomaly_threshold": robust.threshold_,
            "reference_threshold": scored["anomaly"].attrs["threshold"],
            "best_epoch": train.attrs["train"]["best_epoch"],
            "train_samples_per_s": train.attrs["train"]["samples_per_s"],
            "phase": phases.attrs["phase"],
        }
        truth = ground_truth_classes(scan_ds.attrs, tuple(shape))
        figures["with_reference"] = _run_figures(results, truth, label)
        # as most facility scans arrive: no reference, no region declared normal
        alone = wf.model_copy(update={
            "output": str(Path(tmp) / "alone"),
            "anomaly": wf.anomaly.model_copy(update={
                "reference": None, "calibration": "robust", "quantile": None,
                "false_alarm_rate": 0.01})})
        alone_result = Runner(alone, echo=lambda msg: log.info("%s", msg), progress=False,
                              report=False).run()
        seconds["without_reference"] = sum(alone_result.seconds.values())
        figures["without_reference"] = _run_figures(ResultsStore(alone_result.results), truth,
                                                    label)
        # a uniform specimen: Poisson counts around the clean spectrum of one pure pixel, 128 x
        # 128 (twice the side of a small scan; a 4D-STEM noise scan smaller: 48 x 48 patterns
        # of 128 x 128 are 0.3 GB of counts)
        figures["noise"] = _noise_figures(scan_ds, purity, label, alone, Path(tmp), seed,
                                          side=(min(128, 2 * max(shape)) if kind == "eels"
                                                else min(48, max(shape))))
    return PhaseBench(kind=kind, shape=list(shape), channels=channels if kind == "eels" else None,
                      pattern=None if kind == "eels" else list(pattern),
                      latent_dim=latent_dim, epochs=epochs,
                      workers=workers, features_gb=gb, figures=figures, seconds=seconds,
                      details=json_safe(details))
