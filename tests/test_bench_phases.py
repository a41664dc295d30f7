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
