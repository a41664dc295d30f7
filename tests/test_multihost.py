"""Issue 18: emscale across several hosts, simulated on this machine (``scripts/simcluster.py``):
a login host (the scheduler, emscale) and two compute hosts (a Dask worker each), every host a
network namespace with its own address, host name and /tmp, the data on a file system they all
see. Skipped, saying why, where namespaces cannot be made (not root)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import simcluster  # noqa: E402

from emscale.results import ResultsStore  # noqa: E402

WORKFLOW = {
    "train": {"latent_dim": 3, "widths": [16], "epochs": 3, "tile": 8, "threads": 1},
    "pca": {"n_components": 4},
    "cluster": {"k_range": [2, 3], "n_init": 1, "sample_size": 500},
    "chunk_mib": 0.1,  # 4 chunks: both workers get some
}


def _namespaces_work() -> str | None:
    """Why the simulated cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"emst-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture(scope="module")
def cluster():
    """The hosts up for the module; their state and shared data outside /tmp (each host has its
    own /tmp)."""
    why = _namespaces_work()
    if why:
        pytest.skip(f"no simulated multi-host cluster: {why}")
    state = Path(f"/var/tmp/emscale-test-cluster-{os.getpid()}")
    shutil.rmtree(state, ignore_errors=True)
    try:
        cluster_file = simcluster.up(2, state, sys.executable, prefix="emst-")
        (state / "shared").mkdir()
        yield state, cluster_file
    finally:
        simcluster.down(state)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def scan_input(cluster):
    """A raw 32 x 32 x 96 EELS scan on the shared storage."""
    from emscale.synth.eels import synth_eels

    state, _ = cluster
    path = state / "shared" / "scan.npy"
    np.save(path, synth_eels((32, 32), channels=96, anomaly=True, seed=1)["signal"].values)
    return path


def _workflow(cluster, scan_input, name: str) -> Path:
    state, _ = cluster
    path = state / "shared" / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**WORKFLOW, "input": str(scan_input),
                                    "output": str(state / "shared" / name)}))
    return path


def _run_on_login(cluster, wf: Path, kill_at: str | None = None, then=None, cwd=None):
    """``emscale run`` on the login host; with ``kill_at``, ``then()`` is called when a line
    starts so. Returns (exit code, what it printed)."""
    state, cluster_file = cluster
    proc = simcluster.on("login", [sys.executable, "-m", "emscale", "run", str(wf), "--cluster",
                                   str(cluster_file)], state, cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    said = []
    for line in proc.stdout:
        said.append(line)
        if kill_at and line.startswith(kill_at):
            then(proc)
            kill_at = None
    return proc.wait(timeout=300), "".join(said)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, local_client, scan_input):
    """The same workflow on a LocalCluster of this host: what the cluster's runs must equal."""
    from emscale.runner import run_workflow
    from emscale.workflow import validate_workflow

    out = tmp_path_factory.mktemp("local") / "out"
    return run_workflow(validate_workflow({**WORKFLOW, "input": str(scan_input),
                                           "output": str(out)}), echo=lambda *a: None)


def assert_same(results: Path, local) -> None:
    done, ref = ResultsStore(results), ResultsStore(local.results)
    for stage, name in (("encode", "latent"), ("anomaly", "anomaly_score"), ("cluster", "phase")):
        np.testing.assert_array_equal(done.open_stage(stage)[name].values,
                                      ref.open_stage(stage)[name].values)


def _both_workers(cluster) -> None:
    """Every compute host up with its worker (after a test took one down)."""
    state, _ = cluster
    for host in ("node1", "node2"):
        if not simcluster._processes_of(state, host):
            simcluster.start(host, state)
    simcluster.wait_for_workers(state, 2, sys.executable)


def test_a_run_on_three_hosts_killed_then_resumed_equals_a_local_run(cluster, scan_input,
                                                                     local_run):
    """``emscale run`` on the login host, its workers on node1 and node2: SIGKILLed as it
    encodes, run again, it resumes (the finished stages skipped) and its results equal a
    LocalCluster run's; the provenance names the hosts. The workflow's paths are relative to
    where emscale runs, which is not where the workers run (a relative output once failed on
    them with FileNotFoundError)."""
    state, _ = cluster
    shared = state / "shared"
    wf = shared / "three-hosts.yaml"
    wf.write_text(yaml.safe_dump({**WORKFLOW, "input": scan_input.name, "output": "three-hosts"}))
    assert Path.cwd() != shared  # (the workers were started here)
    code, said = _run_on_login(cluster, wf, "[encode]",
                               lambda proc: os.killpg(proc.pid, signal.SIGKILL), cwd=shared)
    assert code == -signal.SIGKILL, said
    assert "dashboard: http://10.77.0.1:8787/status" in said  # the scheduler's, on login
    code, said = _run_on_login(cluster, wf, cwd=shared)
    assert code == 0, said
    assert "skipped: scan, preprocess, pca, train" in said
    results = shared / "three-hosts" / "results.zarr"
    prov = ResultsStore(results).attrs["provenance"]
    assert prov["host"] == "login"
    assert sorted(prov["cluster"]["hosts"].values()) == ["node1", "node2"]
    assert all(a.startswith("tls://10.77.0.1") for a in prov["cluster"]["hosts"])  # TLS
    assert_same(results, local_run)


def test_a_batch_across_hosts_survives_a_compute_host_taken_down(cluster, scan_input,
                                                                  local_run):
    """``emscale batch`` on the login host (its ledger on the shared storage): node1 loses
    power (every process on it SIGKILLed) as the model starts training; the scan's run goes on
    with node2 alone, the ledger says done and the results equal the local run's."""
    from emscale.batch import Ledger

    _both_workers(cluster)
    state, cluster_file = cluster
    scans = state / "shared" / "scans"
    scans.mkdir()
    shutil.copy(scan_input, scans / "a.npy")
    wf = _workflow(cluster, scan_input, "batch")
    out = state / "shared" / "batch-out"
    proc = simcluster.on("login", [sys.executable, "-m", "emscale", "batch", str(scans),
                                   "--workflow", str(wf), "--cluster", str(cluster_file),
                                   "--output", str(out)], state, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    said, killed = [], []
    for line in proc.stdout:
        said.append(line)
        if line.strip().startswith("[train] training set") and not killed:
            killed.extend(simcluster.kill("node1", state))
    assert proc.wait(timeout=300) == 0 and killed, "".join(said)
    assert [e.state for e in Ledger(out / "ledger.sqlite").entries()] == ["done"]
    prov = ResultsStore(out / "a" / "results.zarr").attrs["provenance"]
    assert prov["host"] == "login"
    assert sorted(prov["cluster"]["hosts"].values()) == ["node1", "node2"]  # both, at the start
    assert_same(out / "a" / "results.zarr", local_run)


def test_only_this_cluster_s_certificates_get_in(cluster, scan_input):
    """Every connection of the cluster is TLS with its own certificates: emscale with another
    cluster's certificates, or with none, is refused in one line and writes nothing."""
    from emscale.tls import make_certificates

    state, cluster_file = cluster
    assert "tls: " in cluster_file.read_text()
    other = make_certificates(state / "shared" / "other-ca")
    wf = _workflow(cluster, scan_input, "refused")
    tls_address = f"tls://{simcluster.address('login')}:{simcluster.SCHEDULER_PORT}"
    for data, message in [
        ({"address": tls_address, "tls": str(other)}, f"tls: the scheduler at {tls_address} "
         f"refused the certificates in {other}"),
        ({"address": tls_address.replace("tls:", "tcp:")}, "address: the scheduler at tcp://"),
    ]:
        path = state / "shared" / "refused-cluster.yaml"
        path.write_text(yaml.safe_dump({"type": "address", "timeout": 10, **data}))
        proc = simcluster.run_on("login", [sys.executable, "-m", "emscale", "run", str(wf),
                                           "--cluster", str(path)], state, capture_output=True,
                                 text=True, timeout=120)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("emscale: error: " + message), proc.stderr
    assert not (state / "shared" / "refused").exists()


PLACEMENT = """
import json, platform, sys, time
from distributed import Client, get_task_stream
from emscale.runner import run_workflow
from emscale.tls import security
from emscale.workflow import load_workflow
client = Client(sys.argv[1], security=security(sys.argv[2]))
marks = {}
def echo(line):
    print(line, flush=True)
    marks.setdefault(line[1:].split("]")[0], time.time())
with get_task_stream(client) as ts:
    run_workflow(load_workflow(sys.argv[3]), echo=echo)
print(json.dumps({"hosts": client.run(platform.node), "marks": marks,
                  "tasks": [[str(t["key"]), t["worker"], t["startstops"][0]["start"]]
                            for t in ts.data]}))
"""


def test_training_and_encoding_go_to_the_gpu_node(cluster, scan_input):
    """node2 declares a GPU (``--resources GPU=1``; no device here, so torch runs on its CPU):
    the training task and every task of the encode stage run there, the others anywhere."""
    import json

    state, cluster_file = cluster
    simcluster.kill("node2", state)
    simcluster.start("node2", state, resources="GPU=1")
    _both_workers(cluster)
    wf = _workflow(cluster, scan_input, "gpu-node")
    cfg = yaml.safe_load(cluster_file.read_text())
    try:
        proc = simcluster.run_on("login", [sys.executable, "-c", PLACEMENT, cfg["address"],
                                           cfg["tls"], str(wf)], state, capture_output=True,
                                 text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:  # node2 back as the other tests know it
        simcluster.kill("node2", state)
        simcluster.start("node2", state)
    host, marks = data["hosts"], data["marks"]
    train = [host[w] for k, w, _ in data["tasks"] if k.startswith("train-")]
    assert train == ["node2"], train
    assert "[encode] on the 1 GPU worker(s)" in proc.stdout
    encode = [host[w] for _, w, t in data["tasks"] if marks["encode"] <= t < marks["anomaly"]]
    assert len(encode) >= 4 and set(encode) == {"node2"}, encode
    others = [host[w] for _, w, t in data["tasks"] if t >= marks["anomaly"]]
    assert set(others) == {"node1", "node2"}, others  # the other stages use both


def test_emscale_submit_across_hosts_on_slurm(cluster, scan_input, local_run):
    """A Slurm across the hosts (slurmctld on login, a slurmd on each node, each with its own
    spool, pid and log files): ``emscale submit`` on login sends the run as a job to a node,
    its workers are further jobs on the nodes, all over TLS; the results equal the local run's.
    The output's name has a space, a quote and a %: Slurm must be given them, not a broken
    script (``-o`` quoted, % escaped)."""
    import time

    state, _ = cluster
    root = Path(__file__).resolve().parent.parent
    if subprocess.run(["bash", str(root / "scripts" / "slurm-up.sh"), "--install"],
                      capture_output=True).returncode != 0:
        pytest.skip("Slurm's Debian packages cannot be installed here")
    _both_workers(cluster)
    slurm_cluster = simcluster.slurm_up(state)
    env = simcluster.slurm_env(state)
    wf = _workflow(cluster, scan_input, "night run's 100%")
    proc = simcluster.run_on("login", [sys.executable, "-m", "emscale", "submit", str(wf),
                                       "--cluster", str(slurm_cluster)], state, env=env,
                             capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = proc.stdout.split("submitted job ")[1].split(":")[0]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        queue = simcluster.run_on("login", ["squeue", "-h", "-j", job], state, env=env,
                                  capture_output=True, text=True).stdout
        if not queue.strip():
            break
        time.sleep(1)
    out = Path(yaml.safe_load(wf.read_text())["output"])
    log = (out / f"submit-{job}.out").read_text()
    assert "report: " in log, log[-3000:]
    prov = ResultsStore(out / "results.zarr").attrs["provenance"]
    assert prov["host"] in ("node1", "node2") and prov["cluster"]["type"] == "slurm"
    assert sorted(prov["cluster"]["hosts"].values()) == ["node1", "node2"]
    assert all(j.isdigit() for j in prov["cluster"]["workers"].values())  # Slurm job ids
    assert all(a.startswith("tls://") for a in prov["cluster"]["hosts"])
    assert_same(out / "results.zarr", local_run)
