"""``emscale run``: a workflow's stages in order, cached by config hash, with provenance.

The runner owns what the stage functions do not: the cluster, the order of stages, skipping a
stage whose group already holds the same cache key (a hash of its section and of the keys of the
stages it reads), ``force`` (recompute a stage and everything after it), provenance in the
results store's root attrs, a progress bar per stage, and a log file in the output directory.

Stages: ``scan`` (generate or ingest, unless the input is already a scan store), ``preprocess``,
``pca``, ``train``, ``encode``, ``anomaly``, ``cluster``, then the report. Each stage group is
written atomically (``ResultsStore``); its cache key is added once it is complete, so a stage
that finished is skipped on the next run. A stage killed half-way keeps the chunks it wrote (its
temporary group is named after the cache key) and the next run with the same key computes only the
others; training resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emscale.errors import ConfigError
from emscale.workflow import Workflow

log = logging.getLogger(__name__)

STAGES = ("scan", "preprocess", "pca", "train", "encode", "anomaly", "cluster", "report")


@dataclass
class RunResult:
    output: Path
    results: Path
    report: Path | None
    ran: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("emscale", "numpy", "dask", "distributed", "xarray", "zarr", "torch",
                "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@contextlib.contextmanager
def _log_to(path: Path):
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("emscale")
    old_level = root.level
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def preflight(workflow: Workflow, force: tuple[str, ...] = ()) -> None:
    """What can be refused before a cluster starts or anything is written: unknown ``--force``
    stages, a missing input or reference, a scan too small for the training split (the
    generated scan, or the reference the model trains on)."""
    from emscale.train import check_split

    unknown = sorted(set(force) - set(STAGES))
    if unknown:
        raise ConfigError(f"--force: unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})")
    if workflow.input is not None and not Path(workflow.input).exists():
        raise ConfigError(f"input: {workflow.input}: no such file or directory")
    reference = workflow.anomaly.reference
    if reference is not None:
        from emscale.store import open_scan

        if not Path(reference).exists():
            raise ConfigError(f"anomaly.reference: {reference}: no such file or directory")
        # the model trains on the reference: its split must work there
        check_split(workflow.train_config(), tuple(open_scan(reference)["signal"].shape[:2]))
    elif workflow.synth is not None:
        check_split(workflow.train_config(normal_region=workflow.anomaly.normal_region),
                    tuple(workflow.synth.shape))


class Runner:
    def __init__(self, workflow: Workflow, *, force: tuple[str, ...] = (), progress: bool | None = None,
                 echo=print, cluster_info: dict | None = None):
        preflight(workflow, force)
        self.wf = workflow
        first = min((STAGES.index(s) for s in force), default=len(STAGES))
        self.redo = set(STAGES[first:])  # a forced stage and everything after it
        self.progress = progress
        self.echo = echo
        self.cluster_info = cluster_info or {}
        self.out = Path(workflow.output)
        self.result = RunResult(output=self.out, results=self.out / "results.zarr", report=None)

    # -- caching --------------------------------------------------------------------------------

    def _cached(self, results, stage: str, key: str) -> bool:
        if stage in self.redo or not results.has_stage(stage):
            return False
        return results.stage_attrs(stage).get("config_hash") == key

    def _stage(self, results, stage: str, key: str, compute):
        """Run ``compute()`` (which writes the stage group) unless the group holds ``key``."""
        if self._cached(results, stage, key):
            self.result.skipped.append(stage)
            self.echo(f"[{stage}] up to date (cache key {key}), skipped")
            results.discard_partials(stage)  # e.g. of a forced rerun that was killed
            log.info("stage %s skipped: cache key %s", stage, key)
            return results.open_stage(stage)
        self.echo(f"[{stage}] running")
        t0 = time.perf_counter()
        with results.resumable(stage, key):
            out = compute()
        results.update_attrs({"config_hash": key}, stage=stage)
        if stage in results.resumed:
            found, total = results.resumed.pop(stage)
            self.echo(f"[{stage}] resumed an interrupted write: {found} of {total} chunks were "
                      f"on disk, {total - found} computed")
        self.result.seconds[stage] = time.perf_counter() - t0
        self.result.ran.append(stage)
        log.info("stage %s done in %.1f s (cache key %s)", stage, self.result.seconds[stage], key)
        return results.open_stage(stage) if out is None else out

    # -- the stages -----------------------------------------------------------------------------

    def _scan(self):
        """The scan store to read: the input store itself, or one generated or ingested into
        the output directory (cached by its description)."""
        from emscale.store import open_scan, write_scan

        wf = self.wf
        path = self.out / "scan.zarr"
        marker = self.out / "scan.key"
        if wf.synth is not None:
            key = _key("synth", wf.synth.model_dump(mode="json"), wf.chunk_mib)
        else:
            src = Path(wf.input)  # its existence was checked by preflight
            if (src / "zarr.json").exists() and _is_scan_store(src):
                self.echo(f"[scan] {src} (a scan store, read in place)")
                return open_scan(src), _key("store", str(src.resolve()), src.stat().st_mtime)
            key = _key("ingest", str(src.resolve()), src.stat().st_size, src.stat().st_mtime,
                       wf.chunk_mib)
        if "scan" not in self.redo and path.exists() and marker.exists() \
                and marker.read_text().strip() == key:
            self.result.skipped.append("scan")
            self.echo(f"[scan] {path} up to date, skipped")
            return open_scan(path), key
        self.echo(f"[scan] writing {path}")
        t0 = time.perf_counter()
        marker.unlink(missing_ok=True)
        from emscale.store import ChunkPolicy

        policy = ChunkPolicy.of(wf.chunk_mib)
        if wf.synth is not None:
            s = wf.synth
            if s.kind == "eels":
                from emscale.synth.eels import synth_eels

                ds = synth_eels(s.shape, channels=s.channels, anomaly=s.anomaly, seed=s.seed)
            else:
                from emscale.synth.diffraction import synth_diffraction

                ds = synth_diffraction(s.shape, pattern=s.pattern, anomaly=s.anomaly, seed=s.seed)
            write_scan(ds, path, policy=policy, overwrite=True)
        else:
            from emscale.ingest import ingest

            ingest(wf.input, path, policy=policy, overwrite=True)
        marker.write_text(key)
        self.result.seconds["scan"] = time.perf_counter() - t0
        self.result.ran.append("scan")
        return open_scan(path), key

    def run(self) -> RunResult:
        from emscale.results import ResultsStore

        self.out.mkdir(parents=True, exist_ok=True)
        with _log_to(self.out / "emscale.log"):
            log.info("workflow %s", self.wf.model_dump_json())
            try:
                return self._run(ResultsStore(self.result.results))
            except BaseException:
                # the traceback goes to the log file (INFO: the terminal shows it only with -v)
                log.info("run failed:\n%s", traceback.format_exc())
                raise

    def _run(self, results) -> RunResult:
        from emscale.anomaly import AnomalyScorer, write_anomaly_stage
        from emscale.encode import PCAProjection, write_encode_stage
        from emscale.pca import PCA, write_pca_stage
        from emscale.phases import PhaseClustering, write_phase_stage
        from emscale.preprocess import Preprocessor, write_preprocess_stage
        from emscale.train import ModelSpec, write_train_stage

        wf = self.wf
        # a progress bar per stage on a terminal (distributed's, the tasks run on the cluster)
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        started = _now()
        scan, scan_key = self._scan()
        if wf.input is not None and wf.anomaly.reference is None:  # (the rest: by preflight)
            from emscale.train import check_split

            check_split(wf.train_config(normal_region=wf.anomaly.normal_region),
                        tuple(scan["signal"].shape[:2]))
        results.create({"provenance": {
            "workflow": wf.model_dump(mode="json"), "workflow_hash": wf.section_hash(
                "input", "synth", "preprocess", "pca", "train", "encode", "anomaly", "cluster"),
            "input": {"path": str(wf.input) if wf.input else None,
                      "source": scan.attrs.get("source", {})},
            "versions": _versions(), "host": platform.node(), "python": platform.python_version(),
            "seed": wf.seed, "started": started, "cluster": self.cluster_info}})

        def chain():
            return Preprocessor(list(wf.preprocess.steps), nonfinite=wf.preprocess.nonfinite,
                                negative=wf.preprocess.negative)

        pre_key = _key(scan_key, wf.preprocess.model_dump(mode="json"))
        features = self._stage(results, "preprocess", pre_key, lambda: write_preprocess_stage(
            results, scan, chain(), overwrite=True, progress=show))
        k = wf.train.latent_dim
        pca_key = _key(pre_key, wf.pca.model_dump(mode="json"), k, wf.seed)
        pca = self._stage(results, "pca", pca_key, lambda: write_pca_stage(
            results, features, PCA(max(wf.pca.n_components, k), solver=wf.pca.solver,
                                   seed=wf.seed), error_k=k, overwrite=True, progress=show))

        # where the model learns what is normal: a reference scan, a declared region, or the scan
        an = wf.anomaly
        train_results, train_features, ref_key = results, features, pre_key
        if an.reference is not None:
            from emscale.results import ResultsStore
            from emscale.store import open_scan

            ref = ResultsStore(self.out / "reference.zarr")
            ref_key = _key(str(Path(an.reference).resolve()), pre_key)
            ref_scan = open_scan(an.reference)
            train_features = self._stage(ref, "preprocess", ref_key, lambda: write_preprocess_stage(
                ref, ref_scan, chain(), overwrite=True, progress=show))
            train_results = ref
        config = wf.train_config(normal_region=an.normal_region)
        train_key = _key(ref_key, config.hash())
        train = self._stage(results, "train", train_key, lambda: write_train_stage(
            results, _train(train_results.path / "preprocess", config,
                            self.out / "checkpoints" / train_key),
            overwrite=True))
        resumed = train.attrs["train"].get("resumed_from")
        if "train" in self.result.ran and resumed is not None:
            self.echo(f"[train] resumed from the checkpoint of epoch {resumed}")
            log.info("training resumed from the checkpoint of epoch %d", resumed)
        sig_shape = tuple(features["features"].shape[2:])
        spec = ModelSpec.from_train_stage(train, sig_shape)
        enc_key = _key(train_key, pca_key, wf.encode.model_dump(mode="json"))
        encoded = self._stage(results, "encode", enc_key, lambda: write_encode_stage(
            results, features, spec, pca=PCAProjection.from_pca_stage(pca, k),
            denoised=wf.encode.denoised, error=wf.encode.error, overwrite=True, progress=show))

        def score():
            scorer = AnomalyScorer(an.method, an.calibration, an.quantile, an.false_alarm_rate)
            if an.reference is not None:
                ref_encoded = write_encode_stage(train_results, train_features, spec,
                                                 error=wf.encode.error, overwrite=True)
                scorer.fit(ref_encoded)
            elif an.normal_region is not None:
                y0, y1, x0, x1 = an.normal_region
                mask = np.zeros(features["features"].shape[:2], bool)
                mask[y0:y1, x0:x1] = True
                scorer.fit(encoded, normal=mask)
            else:
                scorer.fit(encoded)
            return write_anomaly_stage(results, encoded, scorer, overwrite=True, progress=show)

        an_key = _key(enc_key, an.model_dump(mode="json"))
        anomaly = self._stage(results, "anomaly", an_key, score)
        cl = wf.cluster
        clustering = PhaseClustering(cl.method, cl.n_clusters, tuple(cl.k_range), cl.k_choice,
                                     cl.n_init, cl.max_iter, sample_size=cl.sample_size,
                                     seed=wf.seed)
        cl_key = _key(an_key, pca_key, cl.model_dump(mode="json"))
        self._stage(results, "cluster", cl_key, lambda: write_phase_stage(
            results, encoded, features, clustering, spec=spec, pca=pca,
            exclude=anomaly["anomaly"], overwrite=True, progress=show))
        report_key = _key(cl_key)
        report_dir = self.out / "report"
        key_file = report_dir / "report.key"
        if "report" in self.redo or not (report_dir / "index.html").exists() \
                or not key_file.exists() or key_file.read_text().strip() != report_key:
            from emscale.report import write_report

            self.echo("[report] writing")
            t0 = time.perf_counter()
            write_report(results, report_dir, timings=self._timings(results))
            key_file.write_text(report_key)
            self.result.seconds["report"] = time.perf_counter() - t0
            self.result.ran.append("report")
        else:
            self.result.skipped.append("report")
            self.echo(f"[report] up to date ({report_dir / 'index.html'}), skipped")
        self.result.report = report_dir / "index.html"
        results.update_attrs({"run": {"finished": _now(), "ran": self.result.ran,
                                      "skipped": self.result.skipped,
                                      "seconds": self.result.seconds}})
        return self.result

    def _timings(self, results) -> dict[str, float]:
        """Seconds per stage: this run's, or the recorded ones of stages it skipped."""
        out = {"scan": self.result.seconds["scan"]} if "scan" in self.result.seconds else {}
        for stage in STAGES[1:-1]:
            if stage in self.result.seconds:
                out[stage] = self.result.seconds[stage]
            elif results.has_stage(stage):
                a = results.stage_attrs(stage)
                try:
                    out[stage] = (_dt.datetime.fromisoformat(a["finished"])
                                  - _dt.datetime.fromisoformat(a["started"])).total_seconds()
                except (KeyError, ValueError):
                    pass
        return out


def _is_scan_store(path: Path) -> bool:
    return (path / "signal" / "zarr.json").exists()


def _train(stage_path, config, checkpoint_dir):
    """Train on the cluster's worker with a GPU when a client is active, else here; the
    checkpoints let a killed run resume."""
    from emscale.train import train_autoencoder, train_on_cluster

    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        client = None
    if client is None:
        return train_autoencoder(stage_path, config, checkpoint_dir=checkpoint_dir)
    return train_on_cluster(client, stage_path, config, checkpoint_dir=str(checkpoint_dir))


def run_workflow(workflow: Workflow, *, force: tuple[str, ...] = (), progress: bool | None = None,
                 echo=print, cluster_info: dict | None = None) -> RunResult:
    return Runner(workflow, force=force, progress=progress, echo=echo,
                  cluster_info=cluster_info).run()
