"""Real Slurm: a single-node Slurm from Debian packages (``scripts/slurm-up.sh``) runs a workflow
inside one allocation (``slurm-runner``); and what the cluster files and submit scripts hold.
Workers as Slurm jobs and ``emscale submit`` run on a Slurm across simulated hosts
(``tests/test_multihost.py``). Skipped, saying why, where Slurm cannot be set up (not root, no
apt)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from emscale.cli import main
from emscale.dask_cluster import load_cluster_file
from emscale.results import ResultsStore

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root to install and start slurmctld/slurmd")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("no Slurm and no apt-get to install it")
    up = subprocess.run(["bash", str(ROOT / "scripts/slurm-up.sh")], capture_output=True, text=True,
                        timeout=300)
    if up.returncode != 0:
        pytest.skip(f"Slurm could not be started: {up.stderr.strip()[-500:]}")
    yield
    subprocess.run(["bash", str(ROOT / "scripts/slurm-up.sh"), "--down"], timeout=60)


def _small_workflow(tmp_path, seed):
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump({
        "synth": {"kind": "eels", "shape": [32, 32], "channels": 128, "seed": seed},
        "output": str(tmp_path / "out"),
        "train": {"latent_dim": 3, "widths": [32, 16], "epochs": 2, "tile": 8, "threads": 1},
        "pca": {"n_components": 4},
        "cluster": {"k_range": [2, 3], "n_init": 1, "sample_size": 1000}}))
    return wf


@pytest.mark.parametrize("path", sorted((ROOT / "cluster_configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_cluster_file_validates(path):
    from emscale.dask_cluster import CLUSTER_TYPES

    assert load_cluster_file(path).type in CLUSTER_TYPES


def test_a_pbs_script_asks_for_the_queue_start_time_and_memory(tmp_path):
    # (what submit refuses, an address cluster or a line break in a name, is the catalogue's)
    from emscale.dask_cluster import load_cluster_file
    from emscale.submit import batch_script

    pbs = tmp_path / "p.yaml"
    pbs.write_text(yaml.safe_dump({"type": "pbs", "queue": "night", "memory": "2GiB"}))
    script, command = batch_script(tmp_path / "wf.yaml", pbs, load_cluster_file(pbs), tmp_path,
                                   begin="2200")
    assert command == "qsub" and "#PBS -q night" in script and "#PBS -a 2200" in script
    assert "mem=2048mb" in script


def test_a_submit_script_passes_hostile_names_literally(tmp_path):
    """Names a shell would run ($(...), backquotes, ;) reach ``emscale run`` as they are."""
    from emscale.dask_cluster import load_cluster_file
    from emscale.submit import batch_script

    wf = tmp_path / "wf $(touch pwned) `touch pwned2`; touch pwned3 'x'.yaml"
    wf.write_text("")
    cluster = tmp_path / "slurm.yaml"
    cluster.write_text(yaml.safe_dump({"type": "slurm", "memory": "2GiB"}))
    script, _ = batch_script(wf, cluster, load_cluster_file(cluster), tmp_path / "out $(x)")
    (line,) = [line for line in script.splitlines() if line.startswith("exec ")]
    shown = subprocess.run(["bash", "-c", "args() { printf '%s\\n' \"$@\"; }; "
                            + line.replace("exec ", "args ", 1)], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert shown[-6:] == ["run", str(wf), "--cluster", str(cluster), "--output",
                          str(tmp_path / "out $(x)")]
    assert not list(tmp_path.glob("pwned*"))


def test_a_workflow_inside_one_slurm_allocation(slurm, tmp_path, capsys):
    """``slurm-runner``: ``emscale submit`` asks for one allocation of 3 tasks (scheduler,
    emscale, one worker) and ``srun`` starts them; the worker is a task of that job."""
    import time

    wf = _small_workflow(tmp_path, seed=3)
    cluster = tmp_path / "runner.yaml"
    cluster.write_text(yaml.safe_dump({
        "type": "slurm-runner", "workers": 1, "threads": 1, "memory": "1GiB",
        "walltime": "00:10:00", "scheduler_file": str(tmp_path / "scheduler-{job_id}.json"),
        "job_extra_directives": ["--overcommit"],  # 3 tasks on this 2-core node
        "dashboard_address": None, "timeout": 120}))
    assert main(["submit", str(wf), "--cluster", str(cluster)]) == 0
    job = capsys.readouterr().out.split("submitted job ")[1].split(":")[0]
    assert "srun " in (tmp_path / "out" / "submit.sh").read_text()
    deadline = time.time() + 240
    while time.time() < deadline and subprocess.run(
            ["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        time.sleep(1)
    log = (tmp_path / "out" / f"submit-{job}.out").read_text()
    assert "report: " in log, log[-3000:]
    prov = ResultsStore(tmp_path / "out" / "results.zarr").attrs["provenance"]
    assert prov["cluster"]["type"] == "slurm-runner"
    assert list(prov["cluster"]["workers"].values()) == [job]  # the worker runs in this job


def test_gpu_workers_as_slurm_jobs_ask_for_a_gpu_and_declare_it(tmp_path):
    """``gpus: 1``: each worker job asks Slurm for a GPU and its worker declares a GPU resource
    (where training and encoding are placed); a job running a local cluster asks for it too."""
    from emscale.dask_cluster import _jobqueue_cluster, load_cluster_file
    from emscale.submit import batch_script

    import psutil

    def listening():
        return {c.laddr for c in psutil.Process().net_connections("tcp")
                if c.status == psutil.CONN_LISTEN}

    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump({"type": "slurm", "gpus": 1, "memory": "2GiB",
                                    "interface": "lo", "dashboard_address": None}))
    before = listening()
    cluster = _jobqueue_cluster(load_cluster_file(path))
    try:
        script = cluster.job_script()
        opened = listening() - before
    finally:
        cluster.close()
    assert "#SBATCH --gres=gpu:1" in script and "--resources GPU=1" in script
    # the scheduler only on the interface named, its HTTP server (no dashboard asked for) on the
    # loopback: dask-jobqueue's default had it on every interface, port 8787
    assert len(opened) >= 2 and {a.ip for a in opened} == {"127.0.0.1"}, opened
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump({"type": "local", "gpus": 1}))
    script, _ = batch_script(tmp_path / "wf.yaml", local, load_cluster_file(local), tmp_path)
    assert "#SBATCH --gres=gpu:1" in script
