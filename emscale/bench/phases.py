"""``emscale bench phases``: phase map and anomaly map of a synthetic EELS scan, with figures.

The whole chain on one LocalCluster (``workers`` processes x 1 thread, emscale's worker
environment). Two synthetic EELS scans of the same material are written as scan stores: a
reference without anomalies (declared normal: the lecture's protocol, train on normal data) and
the scan, with anomalies (``label`` ground truth: 4 phases, -1 for contamination and beam damage).
Both go through ``preprocess`` (unit-sum normalisation); the autoencoder (MLP) is trained on the
reference on one worker; then, for the scan, ``pca`` (gram), ``encode`` (latent, chi-square
reconstruction error, PCA error at the same k), ``anomaly`` (threshold calibrated robustly on the
scan itself at a 1 % false-alarm rate; also the reference's 99th percentile) and ``cluster``
(k-means with K chosen by the inertia's elbow, on the latent codes and on the PCA scores, fitted on
the pixels not flagged anomalous).

Figures:
- ARI of ``phase`` (and ``pca_phase``) against ``label`` over the labelled pixels;
- anomaly recall (flagged among label -1) and false-alarm rate (flagged among the others);
- encode + score throughput against the read+decompress floor of the same ``features`` store on
  the same workers (a dask sum, run twice: the first warms the page cache), in GB/s of float32
  features, and the peak resident memory (VmHWM, reset before) of the busiest worker meanwhile.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emscale.bench.memory import peak_bytes, reset_peak

log = logging.getLogger(__name__)


@dataclass
class PhaseBench:
    shape: list
    channels: int
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
        lines = [f"phase bench: synthetic EELS {self.shape[0]} x {self.shape[1]} x {self.channels} "
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
        return "\n".join(lines)


def _timed(seconds: dict, name: str, fn):
    t0 = time.perf_counter()
    out = fn()
    seconds[name] = time.perf_counter() - t0
    log.info("%s: %.1f s", name, seconds[name])
    return out


def run_phase_bench(shape=(512, 512), channels=1024, latent_dim=4, epochs=20, workers=2,
                    seed=0, max_train_pixels=65536, workdir=None) -> PhaseBench:
    from distributed import Client
    from sklearn.metrics import adjusted_rand_score

    from emscale.anomaly import AnomalyScorer, write_anomaly_stage
    from emscale.cluster import local_cluster
    from emscale.encode import PCAProjection, write_encode_stage
    from emscale.pca import PCA, write_pca_stage
    from emscale.phases import PhaseClustering, phase_stage, write_phase_stage
    from emscale.preprocess import Preprocessor, write_preprocess_stage
    from emscale.results import ResultsStore
    from emscale.store import open_scan, write_scan
    from emscale.synth.eels import EELSGenerator, synth_eels
    from emscale.train import ModelSpec, TrainConfig, train_on_cluster, write_train_stage

    seconds: dict = {}
    chain = [{"step": "normalize", "method": "sum"}]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, \
            local_cluster(n_workers=workers, threads_per_worker=1) as cluster, \
            Client(cluster) as client:
        def prepared(name, scan_seed, anomaly):
            path = Path(tmp) / f"{name}.zarr"
            _timed(seconds, f"synth_{name}", lambda: write_scan(
                synth_eels(tuple(shape), channels=channels, anomaly=anomaly, seed=scan_seed), path))
            results = ResultsStore(Path(tmp) / f"{name}-results.zarr").create()
            features = _timed(seconds, f"preprocess_{name}", lambda: write_preprocess_stage(
                results, open_scan(path), Preprocessor(chain)))
            return results, features

        # the reference: a scan of the same material without anomalies, declared normal
        ref_results, ref_features = prepared("reference", seed + 1, False)
        results, features = prepared("scan", seed, True)
        pca_ds = _timed(seconds, "pca", lambda: write_pca_stage(
            results, features, PCA(max(16, latent_dim)), error_k=latent_dim))
        config = TrainConfig(latent_dim=latent_dim, epochs=epochs, batch_size=256, seed=seed,
                             tile=max(8, min(shape) // 16), max_train_pixels=max_train_pixels)
        result = _timed(seconds, "train", lambda: train_on_cluster(
            client, ref_results.path / "preprocess", config))
        spec = ModelSpec.from_train_stage(write_train_stage(ref_results, result), (channels,))
        proj = PCAProjection.from_pca_stage(pca_ds, latent_dim)
        feats = features["features"].data
        gb = feats.size * 4 / 1e9
        for _ in range(2):  # the first warms the page cache
            _timed(seconds, "floor", lambda: feats.sum().compute())
        ref_encoded = write_encode_stage(ref_results, ref_features, spec)
        client.run(reset_peak)
        encoded = _timed(seconds, "encode", lambda: write_encode_stage(results, features, spec,
                                                                      pca=proj))
        scorer = AnomalyScorer(calibration="robust", false_alarm_rate=0.01)
        _timed(seconds, "anomaly_fit", lambda: scorer.fit(encoded))
        scored = _timed(seconds, "anomaly_score", lambda: write_anomaly_stage(results, encoded,
                                                                             scorer))
        peak = max(client.run(peak_bytes).values())
        reference_scorer = AnomalyScorer(calibration="reference", quantile=0.99).fit(ref_encoded)
        by_reference = reference_scorer.score(encoded)["anomaly"].values
        phases = _timed(seconds, "cluster", lambda: write_phase_stage(
            results, encoded, features, PhaseClustering("kmeans", seed=seed), spec=spec,
            pca=pca_ds, exclude=scored["anomaly"]))
        label = features["label"].values
        normal = label >= 0
        true_k = int(label.max()) + 1
        fixed = phase_stage(encoded["latent"], features,
                            PhaseClustering("kmeans", n_clusters=true_k, seed=seed),
                            exclude=scored["anomaly"])
        flagged = scored["anomaly"].values
        phase, pca_phase = phases["phase"].values, phases["pca_phase"].values
        score_s = seconds["encode"] + seconds["anomaly_fit"] + seconds["anomaly_score"]

        def ari(labels, where=normal):
            return float(adjusted_rand_score(label[where], labels[where]))

        # the label of a boundary pixel is its majority phase: ARI over the pure pixels too
        gen = EELSGenerator(shape=tuple(shape), channels=channels, anomaly=True, seed=seed)
        purity = np.concatenate([gen.purity_block(y, min(y + 64, shape[0]), 0, shape[1])
                                 for y in range(0, shape[0], 64)])
        pure = normal & (purity >= 0.9)

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
            "anomaly_recall": float(flagged[~normal].mean()) if (~normal).any() else float("nan"),
            "anomaly_false_alarm_rate": float(flagged[normal].mean()),
            "anomaly_recall_reference_threshold": float(by_reference[~normal].mean()),
            "anomaly_false_alarm_rate_reference_threshold": float(by_reference[normal].mean()),
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
            "anomaly_threshold": scored["anomaly"].attrs["threshold"],
            "reference_threshold": reference_scorer.threshold_,
            "best_epoch": result.best_epoch,
            "train_samples_per_s": result.samples_per_s,
            "phase": phases.attrs["phase"],
        }
    return PhaseBench(shape=list(shape), channels=channels, latent_dim=latent_dim, epochs=epochs,
                      workers=workers, features_gb=gb, figures=figures, seconds=seconds,
                      details=json.loads(json.dumps(details, default=float)))
