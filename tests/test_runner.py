"""Issue 7 (first part): ``emscale run`` on a LocalCluster: all stages, caching, --force, errors,
the report and provenance."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from emscale.cli import main
from emscale.errors import ConfigError
from emscale.results import ResultsStore
from emscale.runner import run_workflow
from emscale.workflow import load_workflow, validate_workflow

SMALL = {
    "synth": {"kind": "eels", "shape": [32, 32], "channels": 128, "anomaly": True, "seed": 1},
    "train": {"latent_dim": 3, "widths": [32, 16], "epochs": 2, "tile": 8, "threads": 1},
    "pca": {"n_components": 4},
    "cluster": {"k_range": [2, 4], "n_init": 2, "sample_size": 2000},
}


def _write(tmp_path, data, name="wf.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, local_client):
    from unittest import mock

    tmp = tmp_path_factory.mktemp("run")
    wf = validate_workflow({**SMALL, "output": str(tmp / "out")})
    said = []
    # no terminal here: a stage silent for this long says how it is doing
    with mock.patch("emscale.runner.PROGRESS_EVERY", 0.3):
        result = run_workflow(wf, echo=said.append)
    result.said = said
    return wf, result


def test_a_run_without_a_terminal_shows_epochs_and_a_line_while_a_stage_is_silent(first_run):
    said = "\n".join(first_run[1].said)
    assert re.search(r"\[train\] epoch 1/2: train loss [\d.e+-]+, validation loss [\d.e+-]+, "
                     r"[\d.]+ s", said), said
    assert "[train] epoch 2/2" in said
    assert re.search(r"\[train\] training set gathered in [\d.]+ s: 1024 pixels", said), said
    assert re.search(r"\] running for \d+ s: (.+ blocks, .+ GB/s of its input, .+; )?\d+ tasks "
                     r"to do on the cluster", said), said


def test_the_features_are_recomputed_not_stored(first_run):
    import zarr

    results = ResultsStore(first_run[1].results)
    group = zarr.open_group(str(results.path / "preprocess"), mode="r")
    assert "features" not in group and "valid" in group
    pre = results.open_stage("preprocess")
    assert pre["features"].shape == (32, 32, 128)  # rerun from the scan store, lazily
    assert pre.attrs["scan_store"].endswith("scan.zarr")
    # no reference, no normal region: trained on the scan itself, anomalies included: trimmed
    train = results.stage_attrs("train")["train"]
    assert train["config"]["trim"] == 0.1 and train["normal_region"] is None


def test_a_workflow_runs_every_stage_and_writes_the_report(first_run):
    wf, result = first_run
    assert result.ran == ["scan", "preprocess", "pca", "train", "encode", "anomaly", "cluster",
                          "report"]
    results = ResultsStore(result.results)
    assert set(results.stages()) >= {"preprocess", "pca", "train", "encode", "anomaly", "cluster"}
    report = result.report.read_text()
    for title in ("PCA scree", "Reconstruction error", "Loss curves", "Latent space",
                  "Choice of K", "Phase map", "Phase mean signals", "Anomalies", "Timings"):
        assert title in report, title
    assert (result.report.parent / "phases.png").stat().st_size > 1000
    prov = results.attrs["provenance"]
    assert prov["workflow"]["train"]["latent_dim"] == 3 and prov["seed"] == 0
    assert {"numpy", "dask", "zarr", "torch"} <= set(prov["versions"])
    for stage in ("preprocess", "cluster"):
        attrs = results.stage_attrs(stage)
        assert attrs["config_hash"] and attrs["started"] <= attrs["finished"]
    cluster = results.stage_attrs("cluster")
    assert cluster["pca_phase"]["n_clusters"] == cluster["phase"]["n_clusters"]
    assert "stage cluster done" in (result.output / "emscale.log").read_text()


def test_a_uniform_specimen_gets_one_phase_and_the_report_says_why(tmp_path, local_client):
    """Issue 16: Poisson noise around one spectrum (no phases) is K = 1 with its reason in the
    log, the stage's attrs and the report's warnings, not a salt-and-pepper phase map."""
    spectrum = 5 + 40 * np.exp(-np.linspace(0, 3, 128))
    counts = np.random.default_rng(11).poisson(spectrum, (32, 32, 128)).astype(np.uint16)
    np.save(tmp_path / "noise.npy", counts)
    data = {k: v for k, v in SMALL.items() if k != "synth"}
    wf = validate_workflow({**data, "input": str(tmp_path / "noise.npy"),
                            "output": str(tmp_path / "out")})
    result = run_workflow(wf, echo=lambda *a: None)
    phase = ResultsStore(result.results).stage_attrs("cluster")["phase"]
    assert phase["n_clusters"] == 1 and phase["chosen_by"] == "no phase structure"
    # (this briefly trained autoencoder's codes of noise look clustered; the PCA scores do not)
    assert not phase["structure"]["phase_structure"]
    assert phase["structure"]["pca_scores"]["best_silhouette"] < 0.25
    assert "no phase structure" in (result.output / "emscale.log").read_text()
    report = result.report.read_text()
    assert "<h2>Warnings</h2>" in report and "latent codes: no phase structure" in report


def test_a_rerun_skips_what_is_done_and_force_redoes_from_a_stage(first_run, local_client):
    wf, _ = first_run
    again = run_workflow(wf, echo=lambda *a: None)
    assert again.ran == [] and "train" in again.skipped
    forced = run_workflow(wf, force=("anomaly",), echo=lambda *a: None)
    assert forced.ran == ["anomaly", "cluster", "report"]
    # the report's timings of the skipped stages are those their own run recorded
    recorded = ResultsStore(forced.results).stage_attrs("train")["seconds"]
    assert recorded > 0.1 and f"train {recorded:.1f} s" in forced.report.read_text()


def test_a_changed_section_reruns_only_what_depends_on_it(first_run, local_client):
    wf, _ = first_run
    changed = validate_workflow({**wf.model_dump(mode="json"),
                                 "cluster": {**SMALL["cluster"], "method": "gmm"}})
    result = run_workflow(changed, echo=lambda *a: None)
    assert result.ran == ["cluster", "report"]
    assert ResultsStore(result.results).open_stage("cluster").attrs["phase"]["method"] == "gmm"


@pytest.mark.parametrize("data, where", [
    ({"synth": {"kind": "eels"}, "train": {"latent": 3}}, "train.latent"),
    ({"synth": {"kind": "eels"}, "pca": {"n_components": 0}}, "pca.n_components"),
    ({"synth": {"kind": "xrd"}}, "synth.kind"),
    ({"synth": {"kind": "eels"}, "cluster": {"method": "dbscan"}}, "cluster.method"),
    ({"synth": {"kind": "eels"}, "anomaly": {"quantile": 1.5}}, "anomaly.quantile"),
    ({"synth": {"kind": "eels"}, "train": {"epochs": 0}}, "train.epochs"),
    ({"synth": {"kind": "eels"}, "train": {"latent_dim": -1}}, "train.latent_dim"),
    ({"synth": {"kind": "eels"}, "train": {"widths": [64, 0]}}, "train.widths"),
    ({"synth": {"kind": "eels"}, "colour": "red"}, "colour"),
    ({}, "(top level)"),
    # the preprocessing chain is checked before any data are read
    ({"synth": {"kind": "eels"}, "preprocess": {"steps": [{"step": "smooth"}]}},
     "preprocess.steps[0].step"),
    ({"synth": {"kind": "eels"}, "preprocess": {"steps": [{"step": "normalize",
                                                            "method": "total"}]}},
     "preprocess.steps[0].method"),
    ({"synth": {"kind": "eels"}, "preprocess": {"steps": [{"step": "circular_crop"}]}},
     "preprocess.steps[0].step"),
])
def test_bad_workflows_name_the_field(tmp_path, data, where):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {where}:")):
        load_workflow(path)


def test_what_cannot_run_is_refused_before_the_cluster_starts(tmp_path, capsys):
    """A missing input, an unknown --force stage, a scan too small for the training split: one
    line, exit 1, nothing written (no output directory, no cluster started)."""
    out = tmp_path / "out"
    cases = [
        ({**SMALL, "output": str(out)}, ["--force", "bogus"], "--force: unknown stage 'bogus'"),
        ({**SMALL, "synth": None, "input": str(tmp_path / "nope.zarr"), "output": str(out)}, [],
         "nope.zarr: no such file or directory"),
        ({**SMALL, "synth": {**SMALL["synth"], "shape": [8, 8]}, "output": str(out)}, [],
         "train.tile: 8 leaves the 8 x 8 scan a single tile"),
        ({**SMALL, "anomaly": {"reference": str(tmp_path / "ref.zarr")}, "output": str(out)}, [],
         "anomaly.reference: "),
        ({**SMALL, "anomaly": {"normal_region": [0, 48, 0, 16]}, "output": str(out)}, [],
         "normal_region: [0, 48, 0, 16] reaches outside the 32 x 32 scan"),
    ]
    for data, extra, message in cases:
        data = {k: v for k, v in data.items() if v is not None}
        assert main(["run", str(_write(tmp_path, data)), *extra]) == 1
        captured = capsys.readouterr()
        assert message in captured.err and "dashboard" not in captured.out
        assert not out.exists()


def test_info_describes_a_results_store(first_run, capsys):
    _, result = first_run
    assert main(["info", str(result.results)]) == 0
    text = capsys.readouterr().out
    assert "results of emscale run" in text and "latent (y, x, latent_dim) 32x32x3 float32" in text
    assert "the autoencoder's code" in text  # the meaning, from the stage's declaration
    assert text.index("preprocess") < text.index("cluster")  # in pipeline order
    assert main(["info", str(result.results), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["stages"]["train"]["cache_key"] and "provenance" in desc
    assert desc["stages"]["anomaly"]["variables"]["anomaly"]["dims"] == ["y", "x"]


def test_the_report_scores_a_synthetic_scan_against_its_ground_truth(first_run):
    from emscale.evaluate import truth_scores

    _, result = first_run
    from sklearn.metrics import adjusted_rand_score

    results = ResultsStore(result.results)
    scores = truth_scores(results)
    label = results.open_stage("encode")["label"].values
    flagged = results.open_stage("anomaly")["anomaly"].values
    phase = results.open_stage("cluster")["phase"].values
    assert scores["anomaly_recall"] == flagged[label < 0].mean()
    assert scores["anomaly_false_alarm_rate"] == flagged[label >= 0].mean()
    assert scores["ari_phase"] == pytest.approx(
        adjusted_rand_score(label[label >= 0], phase[label >= 0]), abs=1e-12)
    err = results.open_stage("encode")["recon_error"].values
    assert scores["recon_error_normal"] == pytest.approx(np.nanmean(err[label >= 0]), rel=1e-6)
    assert scores["true_k"] == 4 and scores["anomalous_pixels"] == (label < 0).sum() > 0
    page = result.report.read_text()
    assert "Against the ground truth" in page and f"{scores['ari_phase']:.4g}" in page


def test_the_report_shows_big_maps_strided_and_prints_exact_figures(first_run, tmp_path,
                                                                   monkeypatch):
    """The client reads one pixel in s of a map for its pictures (a 100 GB scan's maps do not
    fit beside the workers), and the figures printed stay exact."""
    from emscale import report

    _, result = first_run
    results = ResultsStore(result.results)
    flagged = results.open_stage("anomaly")["anomaly"]
    ny, nx = flagged.shape
    monkeypatch.setattr(report, "MAX_SIDE", -(-max(ny, nx) // 3))
    view, step = report._view(flagged)
    assert step == 3 and view.shape == (-(-ny // 3), -(-nx // 3))
    np.testing.assert_array_equal(view, flagged.values[::3, ::3])
    assert report._exact(flagged.mean()) == [float(flagged.values.mean())]
    page = report.write_report(results, tmp_path / "report").read_text()
    assert "one pixel in 3 along y and x" in page


def test_the_report_puts_the_pca_map_first_where_the_autoencoder_loses(first_run, tmp_path,
                                                                      monkeypatch):
    """Against the ground truth where there is one (ARI), else by the reconstruction error at the
    same size: the page says why and shows the PCA scores' phase map first."""
    import xarray as xr

    from emscale import evaluate, report

    enc = lambda ae, linear: xr.Dataset({"recon_error": (("y", "x"), np.full((2, 2), ae)),
                                         "pca_recon_error": (("y", "x"), np.full((2, 2), linear))})
    assert report._autoencoder_verdict(None, enc(1.0, 1.1)) is None
    assert "no better than PCA" in report._autoencoder_verdict(None, enc(1.2, 1.1))
    truth = {"ari_phase": 0.55, "ari_pca_phase": 0.56}
    assert "ARI 0.560 against" in report._autoencoder_verdict(truth, enc(1.0, 1.1))
    assert report._autoencoder_verdict({**truth, "ari_phase": 0.6}, enc(1.2, 1.1)) is None
    _, result = first_run
    results = ResultsStore(result.results)
    scores = evaluate.truth_scores(results)
    monkeypatch.setattr(evaluate, "truth_scores", lambda r: {**scores, "ari_phase": 0.1,
                                                              "ari_pca_phase": 0.2})
    page = report.write_report(results, tmp_path / "report").read_text()
    assert "PCA scores first: against the ground truth" in page
    assert "the phase map of the PCA scores is shown first</li>" in page


def test_a_variational_workflow_runs_end_to_end_with_a_latent_traverse(tmp_path, local_client):
    """``train.variational``: trained with the KL term, encoded by its mean (the dense numpy
    path, which knows nothing of the variance head), and the report's traverse says so."""
    wf = validate_workflow({**SMALL, "output": str(tmp_path / "out"),
                            "train": {**SMALL["train"], "variational": True, "kl_weight": 0.5}})
    result = run_workflow(wf, echo=lambda *a: None)
    results = ResultsStore(result.results)
    train = results.open_stage("train")
    assert train.attrs["train"]["config"]["variational"] is True
    assert any(item["name"] == "log_var.weight" for item in train["weights"].attrs["layout"])
    latent = results.open_stage("encode")["latent"].values
    assert latent.shape[-1] == 3 and np.isfinite(latent).all()
    page = result.report.read_text()
    assert "Latent traverse" in page and "the variational autoencoder&#x27;s decoded" in page
    assert (result.report.parent / "traverse.png").exists()


def test_command_line_values_override_the_file(tmp_path):
    path = _write(tmp_path, {**SMALL, "output": "elsewhere"})
    wf = load_workflow(path, output=tmp_path / "here")
    assert str(wf.output) == str(tmp_path / "here")
    scan = tmp_path / "scan.zarr"
    wf = load_workflow(path, input=scan)
    assert wf.input == scan and wf.synth is None


def test_emscale_run_cli(tmp_path, capsys):
    path = _write(tmp_path, {**SMALL, "output": str(tmp_path / "out")})
    assert main(["run", str(path), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "dashboard:" in printed and "report: " in printed
    assert re.search(r"phases: K = \d+ \(\w[^)]*\); \d+\.\d\d% flagged", printed), printed
    report = printed.strip().splitlines()[-1].split("report: ")[1]
    assert report.endswith("index.html")
    assert main(["run", str(path), "--force", "nonsense"]) == 1
    assert "--force: unknown stage 'nonsense'" in capsys.readouterr().err
    assert json.loads(json.dumps(ResultsStore(tmp_path / "out" / "results.zarr").attrs))


def test_emscale_defaults_prints_the_real_defaults(capsys):
    """The printed file is YAML that validates to exactly the schema's defaults."""
    assert main(["defaults"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert "# the seed of every random draw" in printed
    data["synth"] = {"kind": "eels"}
    assert validate_workflow(data) == validate_workflow({"synth": {"kind": "eels"}})


WORKFLOW_DIR = Path(__file__).parent.parent / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_every_ready_workflow_validates(path):
    assert load_workflow(path).train.latent_dim >= 1


def _shrunk(path, tmp_path, **sections):
    """A ready workflow file, made small enough for a test."""
    data = yaml.safe_load(path.read_text())
    data["train"] = {**data.get("train", {}), "epochs": 2, "tile": 8, "threads": 1}
    data["cluster"] = {**data.get("cluster", {}), "k_range": [2, 3], "n_init": 1,
                       "sample_size": 1000}
    data["output"] = str(tmp_path / "out")
    data.update(sections)
    return validate_workflow(data)


def test_anomaly_screening_against_a_reference_scan(tmp_path, local_client):
    from emscale.store import write_scan
    from emscale.synth.eels import synth_eels

    write_scan(synth_eels((32, 32), channels=128, seed=5), tmp_path / "reference.zarr")
    write_scan(synth_eels((32, 32), channels=128, anomaly=True, seed=6), tmp_path / "scan.zarr")
    wf = _shrunk(WORKFLOW_DIR / "anomaly-screening.yaml", tmp_path, input=str(tmp_path / "scan.zarr"),
                 anomaly={"reference": str(tmp_path / "reference.zarr"), "calibration": "reference",
                          "false_alarm_rate": None})
    result = run_workflow(wf, echo=lambda *a: None)
    results = ResultsStore(result.results)
    flagged = results.open_stage("anomaly")["anomaly"]
    assert flagged.attrs["calibration"] == "reference"
    assert ResultsStore(tmp_path / "out" / "reference.zarr").has_stage("encode")
    # trained on the reference, which has no anomalies: the plain loss (no trimming)
    assert results.stage_attrs("train")["train"]["config"]["trim"] == 0.0
    assert results.attrs["provenance"]["input"]["path"].endswith("scan.zarr")


def test_4dstem_phase_mapping_workflow(tmp_path, local_client):
    """The shipped chain (central disk masked, log, polar features) and its MLP with the PCA
    path: phase means along the radius in the detector's units, the orientation map, the
    report's sections for both."""
    wf = _shrunk(WORKFLOW_DIR / "4dstem-phase-mapping.yaml", tmp_path, input=None,
                 synth={"kind": "4dstem", "shape": [16, 16], "pattern": [64, 64], "seed": 3},
                 train={"model": "mlp", "latent_dim": 3, "widths": [32, 16], "pca_path": True,
                        "epochs": 2, "tile": 4, "threads": 1, "batch_size": 64,
                        "noise": "gaussian"})
    result = run_workflow(wf, echo=lambda *a: None)
    results = ResultsStore(result.results)
    cl = results.open_stage("cluster")
    assert cl["phase_mean_signal"].dims == ("cluster", "radius", "harmonic")
    assert cl["radius"].attrs["units"] == "1/nm"
    assert "polar_orientation" in results.open_stage("preprocess")
    html = result.report.read_text()
    assert "Phase mean signals" in html and "Orientation" in html
