import json

from emscale.cli import main


def test_bench_phases_runs_the_chain_and_writes_json(tmp_path, capsys):
    """A tiny run of the whole chain on a LocalCluster: every figure is there and sane."""
    out = tmp_path / "phases.json"
    code = main(["bench", "phases", "--shape", "32", "32", "--channels", "64", "--epochs", "2",
                 "--json", str(out)])
    assert code == 0
    assert "anomaly recall" in capsys.readouterr().out
    figures = json.loads(out.read_text())["figures"]
    for name in ("ari", "pca_ari", "ari_at_true_k", "anomaly_recall", "anomaly_false_alarm_rate"):
        assert -1 <= figures[name] <= 1, name
    assert figures["floor_gb_per_s"] > 0 and figures["encode_score_gb_per_s"] > 0
    assert figures["encode_score_peak_worker_gb"] > 0
    # (a 32 x 32 x 64 scan and a 2-epoch autoencoder: the phases are barely there, ARI 0.27 at
    # the true K, and K = 1 with "no phase structure" is a fair answer)
    assert figures["n_clusters"] >= 2 or figures["k_chosen_by"] == "no phase structure"
    # issue 16: per ground-truth class, with and without a reference, and a uniform specimen
    for run in ("with_reference", "without_reference"):
        classes = figures[run]["classes"]["classes"]
        assert list(classes) == ["Fe2O3", "FeO", "Fe3O4", "surface", "F contamination",
                                 "beam damage"]
        for c in classes.values():
            assert max(c["flagged"], c["own_phase"]) <= c["either"] <= 1 and c["pixels"] > 0
        assert 0 <= figures[run]["classes"]["false_alarm_rate"] < 0.05
    assert figures["noise"]["shape"] == [64, 64, 64] and figures["noise"]["flagged"] < 0.05
    assert figures["noise"]["n_clusters"] == 1
    assert figures["noise"]["k_chosen_by"] == "no phase structure"


def test_bench_phases_on_a_4dstem_scan(tmp_path, capsys):
    """``--kind 4dstem``: the shipped 4D-STEM workflow's chain (polar features, an MLP with the
    PCA path, k-means) on generated diffraction scans, the same figures per class."""
    out = tmp_path / "phases.json"
    code = main(["bench", "phases", "--kind", "4dstem", "--shape", "16", "16", "--pattern", "64",
                 "64", "--epochs", "1", "--json", str(out)])
    assert code == 0
    assert "4D-STEM 16 x 16 x 64 x 64" in capsys.readouterr().out
    result = json.loads(out.read_text())
    figures = result["figures"]
    assert result["kind"] == "4dstem" and result["latent_dim"] == 8
    for run in ("with_reference", "without_reference"):
        classes = figures[run]["classes"]["classes"]
        assert len(classes) >= 2 and all(0 <= c["either"] <= 1 for c in classes.values())
    assert figures["noise"]["shape"] == [16, 16, 64, 64]
    assert result["details"]["phase"]["method"] == "kmeans"
