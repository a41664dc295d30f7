"""``emscale bench quality``: the lecture's denoising-autoencoder experiment, reproduced with
emscale's own generator, stages and models, and the same comparison on a large scan.

**The lecture's experiment** (``shared/reference/lecture-unsupervised-learning-em.txt``: 400 noisy
EELS spectra, 4 phase groups of 100, Poisson + Gaussian noise, seed 42; a denoising autoencoder,
3-layer GELU MLP encoder and decoder, bottleneck 4, 300 epochs, cosine schedule):

- Data: two synthetic iron-oxide scans from ``emscale synth eels``'s generator with the ``bands``
  layout (4 bands of pure pixels, one phase each, 100 spectra per phase): the training set (seed
  42) and a held-out test set (seed 43: other noise, thickness and chemical-shift fields). Both go
  through ``preprocess`` (``normalize: max``: spectra scaled to a peak of 1, the lecture's
  "normalised spectra"); the clean spectra go through the same chain.
- PCA (``emscale.pca.PCA``, exact) and the autoencoder (``emscale.train``, MLP with GELU,
  denoising against the clean spectra, Adam with the cosine schedule) are fitted on the training
  set only; everything is measured on the test set, as the lecture asks ("always train PCA and AE
  on the same training set and evaluate on the same test set").
- MSE against the clean test spectra: of the noisy input, of the PCA reconstruction at rank k,
  of the autoencoder's output (``encode``'s ``denoised``).
- Silhouette of k-means with K = 4 (``emscale.phases.PhaseClustering``) on the test codes: the
  autoencoder's latent codes and the PCA scores at the same k.
- Anomalies: a second autoencoder is trained on the training set's three normal phases only (the
  amorphous surface phase, phase D, is left out through ``normal_region``). Its threshold is the
  99th percentile of the reconstruction error of those normal training spectra
  (``AnomalyScorer(method="recon_error", calibration="reference")``); recall is measured on the
  test set's phase D, false alarms on its normal phases, and the error ratio is phase D's mean
  error over the normal phases'.
- The sweep: the same for k = 1..8.

**The large variant**: a spectrum image with spatial phases (Voronoi grains, mixed boundaries, an
amorphous surface band) and anomalous regions (F contamination, beam damage), run by the runner
(``emscale run``'s stages) on a LocalCluster, with a reference scan of the same material declared
normal for training. Added figures: ARI of the phase maps against the ground truth.
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

log = logging.getLogger(__name__)

# The lecture's figures (its notebook summary), printed beside ours.
LECTURE = {"noisy_mse": 0.00449, "pca_mse": 0.00205, "ae_mse": 0.00038, "ae_silhouette": 0.73,
           "pca_silhouette": 0.63, "anomaly_recall": 1.0, "anomaly_error_ratio": 25.0,
           "train_seconds": 120.0}
N_PHASES = 4


@dataclass
class LectureSettings:
    """The experiment's parameters; the defaults are the lecture's."""

    per_phase: int = 100        # spectra per phase group
    width: int = 20             # pixels per row of the synthetic scan (rows = N_PHASES * per_phase / width)
    channels: int = 1024
    latent_dim: int = 4
    widths: tuple = (256, 64)   # encoder hidden layers (the decoder mirrors them): 3 layers each
    epochs: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 42
    sweep: tuple = tuple(range(1, 9))
    n_init: int = 10            # k-means restarts
    threads: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        n = N_PHASES * self.per_phase
        if n % self.width or (n // self.width) % N_PHASES:
            raise ValueError(f"{N_PHASES} x {self.per_phase} spectra do not make bands of "
                             f"width {self.width}")
        return (n // self.width, self.width)


@dataclass
class QualityBench:
    settings: dict
    figures: dict = field(default_factory=dict)
    sweep: list = field(default_factory=list)
    large: dict | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON: every figure at the top level, ``sweep``, ``large``, ``details``."""
        return json.loads(json.dumps({**self.figures, "sweep": self.sweep, "large": self.large,
                                      "settings": self.settings, "details": self.details},
                                     default=float))

    def table(self) -> str:
        f = self.figures
        s = self.settings
        lines = [f"quality bench: the lecture's experiment: {N_PHASES} x {s['per_phase']} "
                 f"synthetic EELS spectra x {s['channels']} channels (train seed {s['seed']}, "
                 f"held-out test seed {s['seed'] + 1}), MLP {s['channels']}-"
                 f"{'-'.join(map(str, s['widths']))}-{s['latent_dim']} GELU, {s['epochs']} "
                 f"epochs, batch {s['batch_size']}, cosine schedule",
                 f"{'figure (test set)':<40}{'emscale':>12}{'lecture':>12}"]

        def row(name, key, fmt):
            ours = f.get(key)
            ref = LECTURE.get(key)
            lines.append(f"{name:<40}{format(ours, fmt) if ours is not None else '-':>12}"
                         f"{format(ref, fmt) if ref is not None else '-':>12}")

        row("MSE noisy input vs clean", "noisy_mse", ".5f")
        row("MSE PCA rank k vs clean", "pca_mse", ".5f")
        row("MSE autoencoder vs clean", "ae_mse", ".5f")
        lines.append(f"{'  autoencoder better than PCA by':<40}{1 - f['ae_mse'] / f['pca_mse']:>12.1%}"
                     f"{1 - LECTURE['ae_mse'] / LECTURE['pca_mse']:>12.1%}")
        lines.append(f"{'  noisy / autoencoder MSE':<40}{f['noisy_mse'] / f['ae_mse']:>11.1f}x"
                     f"{LECTURE['noisy_mse'] / LECTURE['ae_mse']:>11.1f}x")
        row("silhouette k-means K=4, AE codes", "ae_silhouette", ".3f")
        row("silhouette k-means K=4, PCA scores", "pca_silhouette", ".3f")
        row("anomaly recall (phase D, p99)", "anomaly_recall", ".3f")
        row("anomaly false-alarm rate (normal)", "anomaly_false_alarm_rate", ".3f")
        row("anomaly error ratio (D / normal)", "anomaly_error_ratio", ".1f")
        row("training seconds (k=4)", "train_seconds", ".1f")
        if self.sweep:
            lines.append("sweep over the bottleneck k (test set):")
            lines.append(f"{'k':>4}{'PCA MSE':>12}{'AE MSE':>12}{'PCA silh':>10}{'AE silh':>10}")
            for r in self.sweep:
                lines.append(f"{r['k']:>4}{r['pca_mse']:>12.6f}{r['ae_mse']:>12.6f}"
                             f"{r['pca_silhouette']:>10.3f}{r['ae_silhouette']:>10.3f}")
        if self.large:
            g = self.large
            lines.append(f"large variant: {g['shape'][0]} x {g['shape'][1]} x {g['channels']} "
                         f"spectrum image, grains and anomalies, the runner on a LocalCluster of "
                         f"{g['workers']} workers ({g['seconds']:.0f} s)")
            for name, key, fmt in (("MSE noisy vs clean", "noisy_mse", ".6f"),
                                   ("MSE PCA vs clean", "pca_mse", ".6f"),
                                   ("MSE autoencoder vs clean", "ae_mse", ".6f"),
                                   ("silhouette AE codes (K = phases)", "ae_silhouette", ".3f"),
                                   ("silhouette PCA scores", "pca_silhouette", ".3f"),
                                   ("ARI phase map (AE) vs truth", "ari", ".3f"),
                                   ("ARI phase map (PCA) vs truth", "pca_ari", ".3f"),
                                   ("anomaly recall", "anomaly_recall", ".3f"),
                                   ("anomaly false-alarm rate", "anomaly_false_alarm_rate", ".4f"),
                                   ("anomaly error ratio", "anomaly_error_ratio", ".1f")):
                lines.append(f"  {name:<38}{format(g[key], fmt):>12}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the lecture's experiment


def _scan(path: Path, settings: LectureSettings, seed: int):
    from emscale.store import open_scan, write_scan
    from emscale.synth.eels import synth_eels

    write_scan(synth_eels(settings.shape, channels=settings.channels, seed=seed, layout="bands"),
               path)
    return open_scan(path)


def _features(workdir: Path, name: str, scan):
    from emscale.preprocess import Preprocessor, write_preprocess_stage
    from emscale.results import ResultsStore

    results = ResultsStore(workdir / f"{name}-results.zarr").create()
    stage = write_preprocess_stage(results, scan, Preprocessor([{"step": "normalize",
                                                                  "method": "sum"}]))
    return results, stage


def _train(results, settings: LectureSettings, k: int, normal_region=None):
    from emscale.train import ModelSpec, TrainConfig, train_autoencoder, write_train_stage

    config = TrainConfig(model="mlp", latent_dim=k, widths=tuple(settings.widths),
                         epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                         objective="denoise", noise="clean", tile=_tile(settings),
                         patience=settings.epochs, seed=settings.seed, threads=settings.threads,
                         normal_region=normal_region)
    t0 = time.perf_counter()
    result = train_autoencoder(results.path / "preprocess", config)
    seconds = time.perf_counter() - t0
    stage = write_train_stage(results, result, overwrite=True)
    return ModelSpec.from_train_stage(stage, (settings.channels,)), seconds, result


def _tile(settings: LectureSettings) -> int:
    # tiles of a band's height: the validation split takes whole tiles of one phase
    return settings.shape[0] // N_PHASES


def _silhouette(codes: np.ndarray, settings: LectureSettings) -> tuple[float, np.ndarray]:
    import dask.array as da
    from sklearn.metrics import silhouette_score

    from emscale.phases import PhaseClustering

    x = da.from_array(np.ascontiguousarray(codes, np.float32), chunks=(len(codes), codes.shape[1]))
    clustering = PhaseClustering("kmeans", n_clusters=N_PHASES, n_init=settings.n_init,
                                 seed=settings.seed).fit(x)
    labels = np.asarray(clustering.predict(x))
    return float(silhouette_score(codes, labels)), labels


def _flat(a) -> np.ndarray:
    a = np.asarray(a, np.float32)
    return a.reshape(a.shape[0] * a.shape[1], -1)


def run_lecture(settings: LectureSettings | None = None, workdir=None) -> QualityBench:
    import dask
    from sklearn.metrics import adjusted_rand_score

    from emscale.anomaly import AnomalyScorer
    from emscale.encode import PCAProjection, encode_stage
    from emscale.pca import PCA

    settings = settings or LectureSettings()
    ks = sorted(set(settings.sweep) | {settings.latent_dim})
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, dask.config.set(scheduler="synchronous"):
        tmp = Path(tmp)
        train_results, train = _features(tmp, "train", _scan(tmp / "train.zarr", settings,
                                                              settings.seed))
        test_results, test = _features(tmp, "test", _scan(tmp / "test.zarr", settings,
                                                           settings.seed + 1))
        x_train = _flat(train["features"].values)
        x_test, clean_test = _flat(test["features"].values), _flat(test["clean_features"].values)
        label_test = np.asarray(test["label"].values).ravel()
        noisy_mse = float(np.mean((x_test - clean_test) ** 2))
        pca = PCA(max(ks), solver="gram").fit(x_train)
        rows, details = [], {"ari": {}, "best_epoch": {}}
        for k in ks:
            proj = PCAProjection(pca.mean_, pca.components_, k)
            pca_rec = proj.reconstruct(x_test)
            pca_scores = (x_test - pca.mean_) @ pca.components_[:k].T
            spec, seconds, result = _train(train_results, settings, k)
            encoded = encode_stage(test, spec, denoised=True).compute()
            codes = _flat(encoded["latent"].values)
            ae_rec = _flat(encoded["denoised"].values)
            ae_sil, ae_labels = _silhouette(codes, settings)
            pca_sil, pca_labels = _silhouette(pca_scores, settings)
            rows.append({"k": k, "pca_mse": float(np.mean((pca_rec - clean_test) ** 2)),
                         "ae_mse": float(np.mean((ae_rec - clean_test) ** 2)),
                         "pca_silhouette": pca_sil, "ae_silhouette": ae_sil,
                         "train_seconds": seconds})
            details["ari"][k] = {"ae": float(adjusted_rand_score(label_test, ae_labels)),
                                 "pca": float(adjusted_rand_score(label_test, pca_labels))}
            details["best_epoch"][k] = result.best_epoch
            log.info("k=%d: %s", k, rows[-1])
        main = next(r for r in rows if r["k"] == settings.latent_dim)

        # anomalies: a model of the three normal phases (phase D, the last band, left out)
        ny, nx = settings.shape
        normal_rows = ny * (N_PHASES - 1) // N_PHASES
        spec, _, _ = _train(train_results, settings, settings.latent_dim,
                            normal_region=(0, normal_rows, 0, nx))
        train_encoded = encode_stage(train, spec)
        normal_train = np.zeros((ny, nx), bool)
        normal_train[:normal_rows] = True
        scorer = AnomalyScorer(method="recon_error", calibration="reference", quantile=0.99)
        scorer.fit(train_encoded, normal=normal_train)
        scored = scorer.score(encode_stage(test, spec)).compute()
        test_encoded = encode_stage(test, spec).compute()
        err = np.asarray(test_encoded["recon_error"].values).ravel()
        mse_err = np.asarray(encode_stage(test, spec, error="mse")["recon_error"].values).ravel()
        flagged = np.asarray(scored["anomaly"].values).ravel()
        is_d = label_test == N_PHASES - 1
        figures = {
            "noisy_mse": noisy_mse, "pca_mse": main["pca_mse"], "ae_mse": main["ae_mse"],
            "ae_silhouette": main["ae_silhouette"], "pca_silhouette": main["pca_silhouette"],
            "anomaly_recall": float(flagged[is_d].mean()),
            "anomaly_false_alarm_rate": float(flagged[~is_d].mean()),
            "anomaly_error_ratio": float(err[is_d].mean() / err[~is_d].mean()),
            "train_seconds": main["train_seconds"],
        }
        details.update({
            "anomaly_threshold": scorer.threshold_,
            "anomaly_error_metric": test_encoded.attrs["encode"]["error"],
            "anomaly_error_ratio_mse": float(mse_err[is_d].mean() / mse_err[~is_d].mean()),
            "pca_explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
            "train_pixels": int(len(x_train)), "test_pixels": int(len(x_test)),
        })
    return QualityBench(settings={**dataclasses.asdict(settings), "shape": list(settings.shape)},
                        figures=figures, sweep=rows, details=details)
