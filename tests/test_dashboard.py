"""Issue 15 (watched live, first part): the Dask dashboard works out of the box (bokeh is a
dependency) and ``--dashboard-address`` chooses where it listens."""

from __future__ import annotations

import urllib.request

import yaml

from emscale.cli import main
from emscale.dask_cluster import default_cluster_file, open_cluster


def test_the_dashboard_answers_on_a_local_cluster_and_listens_only_on_the_loopback():
    """A port without a host (the default ":8787") once listened on every interface (issue 17):
    the scheduler and dashboard of a local cluster are reached only from this machine."""
    import psutil

    def listening():
        return {c.laddr for c in psutil.Process().net_connections("tcp")
                if c.status == psutil.CONN_LISTEN}

    before = listening()
    cfg = default_cluster_file().model_copy(update={"workers": 1, "dashboard_address": ":0"})
    with open_cluster(cfg) as (_cluster, client):
        link = client.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        page = urllib.request.urlopen(link, timeout=60).read().decode()
        opened = listening() - before
    assert "Dask needs bokeh" not in page and "Dask Diagnostic UI" in page
    assert len(opened) >= 2 and {a.ip for a in opened} == {"127.0.0.1"}, opened


def test_emscale_run_takes_the_dashboard_address(tmp_path, capsys):
    wf = {"synth": {"kind": "eels", "shape": [16, 16], "channels": 64, "seed": 1},
          "train": {"latent_dim": 2, "widths": [16], "epochs": 1, "tile": 4, "threads": 1},
          "pca": {"n_components": 2},
          "cluster": {"k_range": [2, 2], "n_init": 1, "sample_size": 200},
          "output": str(tmp_path / "out")}
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(wf))
    assert main(["run", str(path), "--workers", "1", "--dashboard-address", "127.0.0.1:0"]) == 0
    assert "dashboard: http://127.0.0.1:" in capsys.readouterr().out
    assert main(["run", str(path), "--workers", "1", "--dashboard-address", "none"]) == 0
    assert "dashboard: off" in capsys.readouterr().out


def test_a_local_cluster_with_tls(tmp_path, capsys):
    """``tls: auto``: the LocalCluster's scheduler and workers speak TLS with certificates made
    for it; ``emscale tls DIR`` writes a cluster's certificates (the key private) once."""
    import stat

    cfg = default_cluster_file().model_copy(update={"workers": 1, "dashboard_address": None,
                                                    "tls": "auto"})
    with open_cluster(cfg) as (cluster, client):
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert client.submit(sum, [1, 2]).result() == 3
    assert main(["tls", str(tmp_path / "certs")]) == 0
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == ["ca.pem", "cert.pem",
                                                                      "key.pem"]
    assert stat.S_IMODE((tmp_path / "certs" / "key.pem").stat().st_mode) == 0o600
    capsys.readouterr()
    assert main(["tls", str(tmp_path / "certs")]) == 1  # never overwritten
    assert "ca.pem exists already" in capsys.readouterr().err
