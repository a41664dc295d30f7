"""``emscale bench quality``: the lecture's denoising-autoencoder experiment, reproduced with
emscale's own generator, stages and models, and the same comparison on a large scan.

**The lecture's experiment** (``shared/reference/lecture-unsupervised-learning-em.txt``: 400 noisy
EELS spectra, 4 phase groups of 100, Poisson + Gaussian noise, seed 42; a denoising autoencoder,
3-layer GELU MLP encoder and decoder, bottleneck 4, 300 epochs, cosine schedule):

- Data: two synthetic iron-oxide scans from ``emscale synth eels``'s generator with the ``bands``
  layout (4 bands of pure pixels, one phase each, 100 spectra per phase): the training set (seed
  42) and a held-out test set (seed 43: other noise, thickness and chemical-shift fields). Both go
  through ``preprocess`` (``normalize: sum``); the clean spectra go through the same chain. MSEs
  are reported after one global factor that brings the mean clean training spectrum to a peak
  of 1 (the lecture's "normalised spectra"; see ``_peak_scale``).
- PCA (``emscale.stages.pca.PCA``, exact) and the autoencoder (``emscale.trainer``, MLP with GELU,
  denoising against the clean spectra, Adam with the cosine schedule) are fitted on the training
  set only; everything is measured on the test set, as the lecture asks ("always train PCA and AE
  on the same training set and evaluate on the same test set").
- MSE against the clean test spectra: of the noisy input, of the PCA reconstruction at rank k,
  of the autoencoder's output (``encode``'s ``denoised``).
- Silhouette of k-means with K = 4 (``emscale.stages.cluster.PhaseClustering``) on the test codes: the
  autoencoder's latent codes and the PCA scores at the same k.
- Anomalies: a second autoencoder is trained on the training set's three normal phases only (the
  amorphous surface phase, phase D, is left out through ``normal_region``). Its threshold is the
  99th percentile of the reconstruction error of those normal training spectra
  (``AnomalyScorer(method="recon_error", calibration="reference")``); recall is measured on the
  test set's phase D, false alarms on its normal phases, and the error ratio is phase D's mean
  squared reconstruction error over the normal phases' (the lecture's measure; emscale's own
  chi-square and the model's misfit against the clean spectra are in the details).
- The sweep: the same for k = 1..8.

**The large variant**: a spectrum image with spatial phases (Voronoi grains, mixed boundaries, an
amorphous surface band) and anomalous regions (F contamination, beam damage), run by the runner
(``emscale run``'s stages) on a LocalCluster, with a reference scan of the same material declared
normal for training. PCA for the MSE comparison is fitted on that reference too (the same training
set as the autoencoder; the pipeline's own PCA, fitted on the scan, is reported beside it). Added
figures: ARI of the phase maps against the ground truth.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emscale.config import json_safe
from emscale.errors import ConfigError

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
    channels: int | None = None  # None: 1024 (emscale's spectra, 480-800 eV), 200 (the lecture's)
    # "emscale": emscale's iron-oxide generator (edges, plasmon, thickness), bands layout;
    # "lecture": the lecture's two-Gaussian spectra as it describes them (emscale.synth.lecture)
    data: str = "emscale"
    latent_dim: int = 4
    widths: tuple = (256, 64)   # encoder hidden layers (the decoder mirrors them): 3 layers each
    epochs: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 42
    sweep: tuple = tuple(range(1, 9))
    n_init: int = 10            # k-means restarts
    repeats: int = 3            # trainings of the main bottleneck with other seeds (the spread)
    threads: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        n = N_PHASES * self.per_phase
        if self.width < 1 or n % self.width or (n // self.width) % N_PHASES:
            raise ConfigError(f"per_phase, width: {N_PHASES} x {self.per_phase} spectra do not "
                              f"make {N_PHASES} bands of whole rows of {self.width} pixels")
        return (n // self.width, self.width)

    def __post_init__(self) -> None:
        if self.channels is None:
            self.channels = 200 if self.data == "lecture" else 1024

    def check(self) -> None:
        self.shape  # noqa: B018 (raises when the bands do not fit)
        if self.data not in ("emscale", "lecture"):
            raise ConfigError(f"data: 'emscale' or 'lecture', got {self.data!r}")
        for name in ("per_phase", "latent_dim", "epochs", "batch_size", "n_init", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        if any(k < 1 for k in self.sweep):
            raise ConfigError(f"sweep: bottleneck sizes must be positive, got {list(self.sweep)}")


@dataclass
class QualityBench:
    settings: dict
    figures: dict = field(default_factory=dict)
    sweep: list = field(default_factory=list)
    large: dict | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON: every figure at the top level, ``sweep``, ``large``, ``details``."""
        return json_safe({**self.figures, "sweep": self.sweep, "large": self.large,
                          "settings": self.settings, "details": self.details})

    def table(self) -> str:
        f = self.figures
        s = self.settings
        data = ("the lecture's two-Gaussian spectra, 700-740 eV" if s.get("data") == "lecture"
                else "emscale's iron-oxide spectra, 480-800 eV")
        lines = [f"quality bench: the lecture's experiment: {N_PHASES} x {s['per_phase']} "
                 f"synthetic EELS spectra ({data}) x {s['channels']} channels (train seed {s['seed']}, "
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
        misfit = self.details.get("anomaly", {}).get("error_ratio_against_clean")
        if misfit is not None:
            lines.append(f"{'  the same against the clean spectra':<40}{misfit:>12.1f}"
                         f"{LECTURE['anomaly_error_ratio']:>12.1f}")
        seeds = self.details.get("training_seeds")
        if seeds and seeds.get("ae_mse_sd") is not None:
            lines.append(f"{'  over ' + str(len(seeds['seed'])) + ' training seeds: AE MSE':<40}"
                         f"{seeds['ae_mse_mean']:>12.5f} +- {seeds['ae_mse_sd']:.5f}")
            lines.append(f"{'  over the seeds: AE silhouette':<40}"
                         f"{seeds['ae_silhouette_mean']:>12.3f} +- {seeds['ae_silhouette_sd']:.3f}")
        row(f"training seconds (k={s['latent_dim']})", "train_seconds", ".1f")
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
            for name, key, fmt in (("MSE noisy vs clean (normal pixels)", "noisy_mse", ".6f"),
                                   ("MSE PCA (fit on the reference), normal", "pca_mse", ".6f"),
                                   ("MSE autoencoder vs clean (normal)", "ae_mse", ".6f"),
                                   ("  PCA fitted on the scan itself", "pca_fitted_on_scan_mse",
                                    ".6f"),
                                   ("MSE PCA vs clean (anomalous pixels)", "pca_mse_anomalous",
                                    ".6f"),
                                   ("MSE autoencoder (anomalous pixels)", "ae_mse_anomalous",
                                    ".6f"),
                                   ("silhouette AE codes (K = phases)", "ae_silhouette", ".3f"),
                                   ("silhouette PCA scores", "pca_silhouette", ".3f"),
                                   ("ARI phase map (AE) vs truth", "ari", ".3f"),
                                   ("ARI phase map (PCA) vs truth", "pca_ari", ".3f"),
                                   ("anomaly recall", "anomaly_recall", ".3f"),
                                   ("anomaly false-alarm rate", "anomaly_false_alarm_rate", ".4f"),
                                   ("anomaly error ratio (chi-square)", "anomaly_error_ratio",
                                    ".1f")):
                lines.append(f"  {name:<38}{format(g[key], fmt):>12}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the lecture's experiment


def _scan(path: Path, settings: LectureSettings, seed: int) -> Path:
    from emscale.store import write_scan
    from emscale.synth.eels import synth_eels

    from emscale.synth.lecture import synth_lecture

    if settings.data == "lecture":
        write_scan(synth_lecture(settings.shape, channels=settings.channels, seed=seed), path)
    else:
        write_scan(synth_eels(settings.shape, channels=settings.channels, seed=seed,
                              layout="bands"), path)
    return path


def _features(workdir: Path, name: str, scan_path: Path):
    """The scan through ``emscale run``'s first stage (unit-sum normalisation)."""
    from emscale.results import ResultsStore
    from emscale.runner import run_workflow
    from emscale.workflow import validate_workflow

    wf = validate_workflow({"input": str(scan_path), "output": str(workdir / name),
                            "preprocess": {"steps": [{"step": "normalize", "method": "sum"}]}},
                           source="bench quality")
    run = run_workflow(wf, until="preprocess", echo=lambda msg: log.info("%s", msg),
                       progress=False)
    results = ResultsStore(run.results)
    return results, results.open_stage("preprocess")


def _train(results, settings: LectureSettings, k: int, normal_region=None, seed=None):
    """The registry's ``train`` stage on ``results``' features, written there; its model."""
    from emscale.model_spec import ModelSpec
    from emscale.stages import REGISTRY, NormalData, run_stage
    from emscale.stages.train import TrainConfig

    config = TrainConfig(model="mlp", latent_dim=k, widths=tuple(settings.widths),
                         epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                         weight_decay=settings.weight_decay, objective="denoise", noise="clean",
                         tile=_tile(settings), patience=settings.epochs, threads=settings.threads,
                         max_train_pixels=None, trim=0.0)  # the lecture's plain loss
    normal = NormalData(region=normal_region)
    t0 = time.perf_counter()
    ds = run_stage(REGISTRY["train"], {"preprocess": results.open_stage("preprocess")}, config,
                   seed=settings.seed if seed is None else seed, normal=normal)
    seconds = time.perf_counter() - t0
    stage = results.write_stage("train", ds, overwrite=True)
    return ModelSpec.from_train_stage(stage, (settings.channels,)), seconds, stage


def _encode(features, train, **config):
    """The registry's ``encode`` stage of ``features`` with the model of ``train``."""
    from emscale.stages import REGISTRY, run_stage
    from emscale.stages.encode import EncodeConfig

    return run_stage(REGISTRY["encode"], {"preprocess": features, "train": train},
                     EncodeConfig(**config))


def _tile(settings: LectureSettings) -> int:
    # tiles of a band's height: the validation split takes whole tiles of one phase
    return settings.shape[0] // N_PHASES


def _silhouette(codes: np.ndarray, settings: LectureSettings) -> tuple[float, np.ndarray]:
    import dask.array as da
    from sklearn.metrics import silhouette_score

    from emscale.stages.cluster import PhaseClustering

    x = da.from_array(np.ascontiguousarray(codes, np.float32), chunks=(len(codes), codes.shape[1]))
    clustering = PhaseClustering("kmeans", n_clusters=N_PHASES, n_init=settings.n_init,
                                 seed=settings.seed).fit(x)
    labels = np.asarray(clustering.predict(x))
    return float(silhouette_score(codes, labels)), labels


def _flat(a) -> np.ndarray:
    a = np.asarray(a, np.float32)
    return a.reshape(a.shape[0] * a.shape[1], -1)


def _peak_scale(clean: np.ndarray) -> float:
    """The factor that brings the mean clean spectrum to a peak of 1: MSEs are reported on that
    scale (the lecture's "normalised spectra"; the per-pixel normalisation itself is by the sum,
    unbiased, where a noisy spectrum's maximum is biased up by its noise)."""
    return float(1.0 / np.max(clean.mean(axis=0)))


def _anomaly_experiment(settings: LectureSettings, train_results, train, test, scale2: float):
    """Phase D (the last band) left out of training; threshold at the 99th percentile of the
    normal training spectra's error; recall and false alarms on the test set."""
    from emscale.stages.anomaly import AnomalyScorer

    ny, nx = settings.shape
    normal_rows = ny * (N_PHASES - 1) // N_PHASES
    spec, seconds, model = _train(train_results, settings, settings.latent_dim,
                                  normal_region=(0, normal_rows, 0, nx))
    normal_train = np.zeros((ny, nx), bool)
    normal_train[:normal_rows] = True
    train_encoded, test_encoded = _encode(train, model), _encode(test, model, denoised=True)
    is_d = np.asarray(test["label"].values).ravel() == N_PHASES - 1
    out = {}
    for method in ("recon_error", "combined"):
        scorer = AnomalyScorer(method=method, calibration="reference", quantile=0.99)
        scorer.fit(train_encoded, normal=normal_train)
        flagged = np.asarray(scorer.score(test_encoded)["anomaly"].values).ravel()
        out[method] = {"recall": float(flagged[is_d].mean()),
                       "false_alarm_rate": float(flagged[~is_d].mean()),
                       "threshold": scorer.threshold_}
    err = np.asarray(test_encoded["recon_error"].values).ravel()
    mse = np.asarray(_encode(test, model, error="mse")["recon_error"].values).ravel()
    rec = _flat(test_encoded["denoised"].values)
    misfit = ((rec - _flat(test["clean_features"].values)) ** 2).mean(axis=1) * scale2
    return {
        "recall": out["recon_error"]["recall"],
        "false_alarm_rate": out["recon_error"]["false_alarm_rate"],
        # the lecture's figure: the mean squared error against the (noisy) input spectrum
        "error_ratio": float(mse[is_d].mean() / mse[~is_d].mean()),
        "details": {
            "error_metric_of_the_threshold": test_encoded.attrs["encode"]["error"],
            "error_ratio_chi_square": float(err[is_d].mean() / err[~is_d].mean()),
            # the model's own misfit: its output against the clean spectrum (synthetic data only)
            "error_ratio_against_clean": float(misfit[is_d].mean() / misfit[~is_d].mean()),
            "mse_against_clean_normal": float(misfit[~is_d].mean()),
            "mse_against_clean_phase_d": float(misfit[is_d].mean()),
            "by_method": out, "train_seconds": seconds,
            "best_epoch": model.attrs["train"]["best_epoch"],
            "left_out_phase": "surface (amorphous)",
        }}


def run_lecture(settings: LectureSettings | None = None, workdir=None) -> dict:
    """The lecture's experiment: figures at the settings' bottleneck, the sweep, details."""
    import dask
    from sklearn.metrics import adjusted_rand_score

    from emscale.stages.encode import PCAProjection
    from emscale.stages.pca import PCA

    settings = settings or LectureSettings()
    settings.check()
    ks = sorted(set(settings.sweep) | {settings.latent_dim})
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, dask.config.set(scheduler="synchronous"):
        tmp = Path(tmp)
        train_results, train = _features(tmp, "train", _scan(tmp / "train.zarr", settings,
                                                              settings.seed))
        _, test = _features(tmp, "test", _scan(tmp / "test.zarr", settings, settings.seed + 1))
        x_train = _flat(train["features"].values)
        x_test, clean_test = _flat(test["features"].values), _flat(test["clean_features"].values)
        label_test = np.asarray(test["label"].values).ravel()
        scale2 = _peak_scale(_flat(train["clean_features"].values)) ** 2
        noisy_mse = float(np.mean((x_test - clean_test) ** 2)) * scale2
        pca = PCA(max(ks), solver="gram").fit(x_train)
        rows, details = [], {"ari": {}, "best_epoch": {}}
        for k in ks:
            proj = PCAProjection(pca.mean_, pca.components_, k)
            pca_scores = (x_test - pca.mean_) @ pca.components_[:k].T
            spec, seconds, model = _train(train_results, settings, k)
            encoded = _encode(test, model, denoised=True).compute()
            codes = _flat(encoded["latent"].values)
            ae_sil, ae_labels = _silhouette(codes, settings)
            pca_sil, pca_labels = _silhouette(pca_scores, settings)
            rows.append({
                "k": k,
                "pca_mse": float(np.mean((proj.reconstruct(x_test) - clean_test) ** 2)) * scale2,
                "ae_mse": float(np.mean((_flat(encoded["denoised"].values) - clean_test) ** 2))
                * scale2,
                "pca_silhouette": pca_sil, "ae_silhouette": ae_sil, "train_seconds": seconds})
            details["ari"][k] = {"ae": float(adjusted_rand_score(label_test, ae_labels)),
                                 "pca": float(adjusted_rand_score(label_test, pca_labels))}
            details["best_epoch"][k] = model.attrs["train"]["best_epoch"]
            log.info("k=%d: %s", k, rows[-1])
        main = next(r for r in rows if r["k"] == settings.latent_dim)
        # the same model trained with other seeds (initial weights, split, batches): the spread
        # of the autoencoder's figures that comes from training alone
        spread = {"seed": [settings.seed], "ae_mse": [main["ae_mse"]],
                  "ae_silhouette": [main["ae_silhouette"]]}
        for seed in range(settings.seed + 1, settings.seed + settings.repeats):
            _, _, model = _train(train_results, settings, settings.latent_dim, seed=seed)
            encoded = _encode(test, model, denoised=True).compute()
            spread["seed"].append(seed)
            spread["ae_mse"].append(float(np.mean(
                (_flat(encoded["denoised"].values) - clean_test) ** 2)) * scale2)
            spread["ae_silhouette"].append(_silhouette(_flat(encoded["latent"].values),
                                                       settings)[0])
        stats = {}
        for name in ("ae_mse", "ae_silhouette"):
            stats[f"{name}_mean"] = float(np.mean(spread[name]))
            n = len(spread[name])  # (the sample sd: one training gives none)
            stats[f"{name}_sd"] = float(np.std(spread[name], ddof=1)) if n > 1 else None
        details["training_seeds"] = {**spread, **stats}
        # PCA's error on the clean test spectra themselves: the part of its error that is the
        # spectra's curvature away from a rank-k subspace (what a non-linear model can win)
        proj = PCAProjection(pca.mean_, pca.components_, settings.latent_dim)
        details["pca_mse_of_clean_spectra"] = float(
            np.mean((proj.reconstruct(clean_test) - clean_test) ** 2)) * scale2
        anomaly = _anomaly_experiment(settings, train_results, train, test, scale2)
    figures = {
        "noisy_mse": noisy_mse, "pca_mse": main["pca_mse"], "ae_mse": main["ae_mse"],
        "ae_silhouette": main["ae_silhouette"], "pca_silhouette": main["pca_silhouette"],
        "anomaly_recall": anomaly["recall"],
        "anomaly_false_alarm_rate": anomaly["false_alarm_rate"],
        "anomaly_error_ratio": anomaly["error_ratio"],
        "train_seconds": main["train_seconds"],
    }
    details.update({
        "anomaly": anomaly["details"], "mse_scale": "spectra normalised by their sum, then "
        "scaled by one factor that brings the mean clean training spectrum to a peak of 1",
        "pca_explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
        "train_pixels": int(len(x_train)), "test_pixels": int(len(x_test)),
    })
    sweep = [{k: r[k] for k in ("k", "pca_mse", "ae_mse", "pca_silhouette", "ae_silhouette")}
             for r in rows if r["k"] in settings.sweep]
    return {"figures": figures, "sweep": sweep, "details": details}


# ---------------------------------------------------------------------------------------------
# the large variant: the whole distributed pipeline


def _pca_reconstruct_block(block, mean, components):
    from emscale.stages.encode import PCAProjection

    by, bx = block.shape[:2]
    x = np.asarray(block, np.float32).reshape(by * bx, -1)
    return PCAProjection(mean, components, len(components)).reconstruct(x).reshape(block.shape)


def _sample_silhouette(codes: np.ndarray, labels: np.ndarray, where: np.ndarray, n: int,
                       seed: int) -> float:
    from sklearn.metrics import silhouette_score

    idx = np.flatnonzero(where.ravel() & (labels.ravel() >= 0))
    rng = np.random.default_rng(seed)
    idx = rng.choice(idx, size=min(n, len(idx)), replace=False)
    flat = codes.reshape(-1, codes.shape[-1])
    return float(silhouette_score(flat[idx], labels.ravel()[idx]))


def run_large(shape=(256, 256), channels=1024, latent_dim=4, epochs=20, workers=2, seed=42,
              silhouette_pixels=5000, workdir=None) -> dict:
    """A spectrum image with grains, mixed boundaries, a surface band and anomalous regions,
    through ``emscale run``'s stages on a LocalCluster; the model is trained and its threshold
    calibrated on a reference scan of the same material without anomalies."""
    from distributed import Client

    from emscale.dask_cluster import local_cluster
    from emscale.evaluate import mse_against, truth_scores
    from emscale.results import ResultsStore
    from emscale.runner import run_workflow
    from emscale.stages.pca import PCA
    from emscale.store import feature_matrix, write_scan
    from emscale.synth.eels import synth_eels
    from emscale.workflow import validate_workflow

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, \
            local_cluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) \
            as cluster, Client(cluster):
        tmp = Path(tmp)
        reference = tmp / "reference.zarr"
        write_scan(synth_eels(tuple(shape), channels=channels, anomaly=False, seed=seed + 1),
                   reference)
        wf = validate_workflow({
            "synth": {"kind": "eels", "shape": list(shape), "channels": channels,
                      "anomaly": True, "seed": seed},
            "output": str(tmp / "run"), "seed": seed,
            "preprocess": {"steps": [{"step": "normalize", "method": "sum"}]},
            "pca": {"n_components": 16},
            "train": {"latent_dim": latent_dim, "widths": [256, 64], "epochs": epochs,
                      "batch_size": 256, "tile": max(8, min(shape) // 16)},
            "encode": {"denoised": True},
            "anomaly": {"reference": str(reference), "calibration": "reference",
                        "quantile": 0.99},
            "cluster": {"method": "kmeans", "n_clusters": "auto"},
        }, source="bench quality (large)")
        run = run_workflow(wf, echo=lambda msg: log.info("%s", msg), report=False)
        results = ResultsStore(run.results)
        truth = truth_scores(results)
        pre, pca = results.open_stage("preprocess"), results.open_stage("pca")
        enc, cl = results.open_stage("encode"), results.open_stage("cluster")
        clean, noisy = pre["clean_features"].data, pre["features"].data
        scale2 = float(1.0 / clean.mean(axis=(0, 1)).max().compute()) ** 2
        # PCA fitted on the reference, like the autoencoder (the same training set); the
        # pipeline's own PCA stage, fitted on the scan itself (anomalies included), beside it
        ref_features = ResultsStore(run.output / "reference.zarr").open_stage("preprocess")
        ref_pca = PCA(latent_dim, solver="gram").fit(feature_matrix(ref_features["features"]))

        def reconstruct(mean, components):
            return noisy.map_blocks(_pca_reconstruct_block, np.asarray(mean).ravel(),
                                    np.asarray(components)[:latent_dim].reshape(latent_dim, -1),
                                    dtype=np.float32, token="bench-pca-reconstruct")

        pca_rec = reconstruct(ref_pca.mean_, ref_pca.components_)
        scan_pca_rec = reconstruct(pca["pca_mean"].values, pca["pca_components"].values)
        label = np.asarray(enc["label"].values)
        normal = label >= 0
        # over the normal pixels: the denoising; the anomalous ones are reported apart (the
        # model never saw such spectra and is meant to reconstruct them badly)
        figures = {
            "noisy_mse": mse_against(noisy, clean, normal) * scale2,
            "pca_mse": mse_against(pca_rec, clean, normal) * scale2,
            "ae_mse": mse_against(enc["denoised"].data, clean, normal) * scale2,
            "pca_mse_anomalous": mse_against(pca_rec, clean, ~normal) * scale2,
            "pca_fitted_on_scan_mse": mse_against(scan_pca_rec, clean, normal) * scale2,
            "ae_mse_anomalous": mse_against(enc["denoised"].data, clean, ~normal) * scale2,
            "ae_silhouette": _sample_silhouette(enc["latent"].values, cl["phase"].values, normal,
                                                silhouette_pixels, seed),
            "pca_silhouette": _sample_silhouette(
                pca["pca_scores"].values[..., :latent_dim], cl["pca_phase"].values, normal,
                silhouette_pixels, seed),
            "ari": truth["ari_phase"], "pca_ari": truth["ari_pca_phase"],
            "anomaly_recall": truth["anomaly_recall"],
            "anomaly_false_alarm_rate": truth["anomaly_false_alarm_rate"],
            "anomaly_error_ratio": truth["recon_error_anomalous"] / truth["recon_error_normal"],
            "n_clusters": truth["n_clusters"], "true_k": truth["true_k"],
        }
        seconds = dict(run.seconds)
    return {"shape": list(shape), "channels": channels, "latent_dim": latent_dim,
            "epochs": epochs, "workers": workers, "seconds": time.perf_counter() - t0,
            "stage_seconds": seconds, **figures, "truth": truth}


def run_quality_bench(settings: LectureSettings | None = None, large_shape=(256, 256),
                      large_epochs: int = 20, workers: int = 2, workdir=None) -> QualityBench:
    settings = settings or LectureSettings()
    lecture = run_lecture(settings, workdir=workdir)
    large = None
    if large_shape is not None:
        large = run_large(tuple(large_shape),
                          channels=settings.channels if settings.data == "emscale" else 1024,
                          latent_dim=settings.latent_dim, epochs=large_epochs, workers=workers,
                          seed=settings.seed, workdir=workdir)
    return QualityBench(settings={**dataclasses.asdict(settings), "shape": list(settings.shape)},
                        figures=lecture["figures"], sweep=lecture["sweep"], large=large,
                        details=lecture["details"])
