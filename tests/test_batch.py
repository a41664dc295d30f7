"""``emscale batch`` / ``emscale status``: a ledger, skips on a rerun, one broken scan that does
not stop the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from emscale.batch import Ledger, list_scans, run_batch, status_table
from emscale.cli import main
from emscale.store import write_scan
from emscale.synth.eels import synth_eels

WORKFLOW = {
    "input": "unused", "output": "unused",
    "train": {"latent_dim": 3, "widths": [32, 16], "epochs": 2, "tile": 8, "threads": 1},
    "pca": {"n_components": 4},
    "cluster": {"k_range": [2, 3], "n_init": 1, "sample_size": 1000},
}


def _scans(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for seed in (1, 2):  # two versions of one scan: one name up to the first dot
        write_scan(synth_eels((32, 32), channels=128, anomaly=True, seed=seed),
                   scans / f"scan.v{seed}.zarr")
    np.save(scans / "broken.npy", np.zeros((4, 4), np.float32))  # no signal dimension
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump(WORKFLOW))
    return scans, wf


def test_output_names_never_shared_nor_hidden(tmp_path):
    from emscale.batch import output_names

    scans = [Path(p) for p in ("d/x.v1.zarr", "d/x.v2.zarr", "d/x.npy", "d/x.zarr", "e/x.npy",
                               "d/.hidden.npy", "d/plain")]
    names = output_names(scans)
    assert len(set(names.values())) == len(scans)
    assert names[scans[0]] == "x.v1" and names[scans[6]] == "plain"
    assert names[scans[5]] == "hidden" and not any(n.startswith(".") for n in names.values())
    assert names == output_names(scans)  # the same on a rerun


def test_manifest_and_status_cli(tmp_path, capsys, monkeypatch):
    (tmp_path / "m.txt").write_text("# scans\na.zarr\n/abs/b.zarr  # absolute\n\n")
    assert [p.name for p in list_scans(tmp_path / "m.txt")] == ["a.zarr", "b.zarr"]
    assert main(["status", str(tmp_path / "nothing.sqlite")]) == 1
    assert "no ledger" in capsys.readouterr().err
    # a bare status: says where it looked, then finds the shipped batch workflow's ledger
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert "ledger.sqlite, results/overnight/ledger.sqlite, emscale-output/ledger.sqlite" in err
    Ledger(tmp_path / "results" / "overnight" / "ledger.sqlite").set("/d/x.npy", state="pending")
    assert main(["status"]) == 0
    assert "0 done, 0 failed, 0 running, 1 pending" in capsys.readouterr().out


def test_a_ledger_of_an_older_emscale_reads_and_takes_the_new_columns(tmp_path):
    import sqlite3

    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:  # the schema before K, % flagged and the report
        db.execute("CREATE TABLE scans (scan TEXT PRIMARY KEY, state TEXT NOT NULL, output TEXT, "
                   "error TEXT, started TEXT, finished TEXT, seconds REAL, workflow_hash TEXT)")
        db.execute("INSERT INTO scans VALUES ('/d/a.zarr', 'done', '/o/a', NULL, 't0', 't1', "
                   "12.5, 'h')")
    (old,) = Ledger(path, readonly=True).entries()  # emscale status: read as it is
    assert (old.state, old.seconds, old.k, old.report) == ("done", 12.5, None, None)
    assert "a.zarr  done       -        -      12.5 s" in status_table(path)
    ledger = Ledger(path)  # a batch: migrated
    ledger.set("/d/a.zarr", k=3, flagged=0.0125, report="/o/a/report/index.html")
    (new,) = ledger.entries()
    assert (new.seconds, new.k, new.flagged, new.workflow_hash) == (12.5, 3, 0.0125, "h")
    assert "a.zarr  done       3    1.25%      12.5 s  /o/a/report/index.html" in status_table(path)


def test_a_rerun_with_nothing_to_do_starts_no_cluster(tmp_path, monkeypatch, capsys):
    import emscale.dask_cluster
    import emscale.runner

    monkeypatch.setattr(emscale.runner, "run_workflow", lambda wf, **kw: None)
    scans = tmp_path / "scans"
    scans.mkdir()
    np.save(scans / "x.npy", np.ones((4, 4, 8), np.uint16))
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump(WORKFLOW))
    assert run_batch(scans, wf, output_root=tmp_path / "out", echo=lambda *a: None)["done"]

    def no_cluster(cfg):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(emscale.dask_cluster, "open_cluster", no_cluster)
    assert main(["batch", str(scans), "--workflow", str(wf), "--output",
                 str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "nothing to run" in printed and "dashboard:" not in printed
    assert "1 scans: 0 done, 0 failed, 1 skipped" in printed


def test_batch_cli_exits_1_when_a_scan_failed(tmp_path, capsys):
    """Only the broken scan (a scan that runs is the test below's); ``emscale batch`` as a user
    starts it, port 8787 taken (another run's dashboard): its cluster starts and closes without
    a word on stderr (distributed warned of the port, and of workers it had to kill)."""
    import os
    import socket
    import subprocess
    import sys

    scans = tmp_path / "scans"
    scans.mkdir()
    np.save(scans / "broken.npy", np.zeros((4, 4), np.float32))  # no signal dimension
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump(WORKFLOW))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 8787))
            taken.listen()
        except OSError:  # taken already
            pass
        proc = subprocess.run([sys.executable, "-m", "emscale", "batch", str(scans), "--workflow",
                               str(wf), "--output", str(tmp_path / "out")], env=env,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    printed = proc.stdout
    assert "0 done, 1 failed" in printed and "dashboard: http://127.0.0.1:" in printed
    assert "127.0.0.1:8787" not in printed
    assert main(["status", str(tmp_path / "out" / "ledger.sqlite")]) == 0
    assert "0 done" in capsys.readouterr().out
    assert main(["status", str(tmp_path / "out")]) == 0  # the batch's output directory
    assert "1 failed" in capsys.readouterr().out
    # the broken file is refused before its run starts: one line naming it, no output left
    assert "broken.npy: 2-D array (shape (4, 4)); need 3-D" in printed
    assert not (tmp_path / "out" / "broken").exists()


def test_a_new_scan_never_takes_a_directory_the_ledger_gave_out(tmp_path, monkeypatch):
    """x.v1.npy ran (out/x.v1); then x.v1.zarr comes: it gets its own directory, not x.v1's."""
    import emscale.runner

    ran = []
    monkeypatch.setattr(emscale.runner, "run_workflow", lambda wf, **kw: ran.append(wf.output))
    scans = tmp_path / "scans"
    scans.mkdir()
    np.save(scans / "x.v1.npy", np.ones((4, 4, 8), np.uint16))
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump(WORKFLOW))
    run_batch(scans, wf, output_root=tmp_path / "out", echo=lambda *a: None)
    (scans / "x.v1.npy").unlink()
    np.save(scans / "x.v1.zarr.npy", np.ones((4, 4, 8), np.uint16))  # stem "x.v1.zarr"
    (scans / "x.v1.zarr.npy").rename(scans / "x.v1.zarr")
    run_batch(scans, wf, output_root=tmp_path / "out", echo=lambda *a: None)
    assert len(ran) == 2 and ran[0] != ran[1] and ran[0].name == "x.v1", ran


def test_a_batch_killed_mid_scan_then_rerun_with_a_broken_scan(tmp_path, local_client):
    """``emscale batch`` SIGKILLed while its first good scan is encoding (the broken one has
    failed before it): the ledger says so and nothing else. The rerun resumes that scan (its
    finished stages skipped), runs the other, retries the broken one; the ledger then holds each
    scan once, in its own output; a second rerun skips the done ones. The scans are untouched."""
    import os
    import signal
    import subprocess
    import sys

    scans, wf = _scans(tmp_path)
    out = tmp_path / "out"

    def contents():
        return {p: p.read_bytes() for p in sorted(scans.rglob("*")) if p.is_file()}

    before = contents()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "emscale", "batch", str(scans), "--workflow",
                             str(wf), "--output", str(out), "--dashboard-address", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env, start_new_session=True)
    said = []
    for line in proc.stdout:
        said.append(line)
        if line.strip().startswith("[encode]"):
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert said[-1].strip().startswith("[encode]") and "scan.v1.zarr: running" in "".join(said)
    states = sorted((Path(e.scan).name, e.state) for e in Ledger(out / "ledger.sqlite").entries())
    assert states == [("broken.npy", "failed"), ("scan.v1.zarr", "running")]
    page = (out / "index.html").read_text()  # rewritten as each scan started and ended
    assert page.count("<td class=\"scan\">") == 2 and '"state running"' in page and "need 3-D" in page

    lines = []
    again = run_batch(scans, wf, output_root=out, echo=lines.append)
    assert len(again["done"]) == 2 and again["failed"][0].endswith("broken.npy")
    assert "2 done, 1 failed" in lines[-1]
    first = "\n".join(lines).split("scan.v2.zarr")[0]
    assert "scan.v1.zarr: running" in first and "[encode] running" in first
    assert "[preprocess] running" not in first and "[train] running" not in first, first
    entries = Ledger(out / "ledger.sqlite").entries()
    assert sorted((Path(e.scan).name, e.state) for e in entries) == [
        ("broken.npy", "failed"), ("scan.v1.zarr", "done"), ("scan.v2.zarr", "done")]
    assert "broken.npy" in [e for e in entries if e.state == "failed"][0].error
    for seed in (1, 2):  # each version its own output (they once shared out/scan)
        assert (out / f"scan.v{seed}" / "report" / "index.html").exists()
    # a rerun skips the done scans and retries the failed one
    again = run_batch(scans, wf, output_root=out, echo=lines.append)
    assert len(again["skipped"]) == 2 and len(again["failed"]) == 1
    table = status_table(out / "ledger.sqlite")
    assert "2 done, 1 failed, 0 running, 0 pending" in table
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:-1]}
    entries = {Path(e.scan).name: e for e in Ledger(out / "ledger.sqlite").entries()}
    for name in ("scan.v1.zarr", "scan.v2.zarr"):  # state, K, % flagged, time, report
        e = entries[name]
        assert e.k in (2, 3) and e.k_chosen_by and 0 < e.flagged < 0.5, e
        assert rows[name][1:4] == ["done", str(e.k), f"{100 * e.flagged:.2f}%"]
        assert rows[name][-1] == e.report and Path(e.report).name == "index.html"
    assert rows["broken.npy"][1:3] == ["failed", "-"] and "need 3-D" in table
    # the overview page: a row per scan, each report linked relative to the page
    import re

    page = (out / "index.html").read_text()
    assert page.count("<td class=\"scan\">") == 3 and "need 3-D" in page and "refresh" not in page
    links = re.findall(r'href="([^"]+)"', page)
    assert sorted(links) == ["scan.v1/report/index.html", "scan.v2/report/index.html"]
    assert f"{100 * entries['scan.v1.zarr'].flagged:.2f}%" in page
    assert contents() == before  # the scans, read in place, are as they were
