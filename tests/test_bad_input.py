"""Faults, as a user meets them (issue 17): a full disk, a killed worker, Ctrl-C, a lost or
damaged results chunk, an input changed in place. They are real runs on a LocalCluster, their
results compared with a run that had none. Refusals of bad input are the catalogue's
(``test_catalogue.py``); a whole run killed in each stage is ``test_resume.py``'s."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from emscale.store import write_scan
from emscale.synth.eels import synth_eels

WORKFLOW = {
    "train": {"latent_dim": 3, "widths": [32, 16], "epochs": 1, "tile": 4, "threads": 1},
    "pca": {"n_components": 4},
    "cluster": {"k_range": [2, 3], "n_init": 1},
}


@pytest.fixture(scope="module")
def scan_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "s.zarr"
    write_scan(synth_eels((12, 10), channels=96, seed=3), path)
    return path


def workflow(tmp_path, **sections) -> str:
    data = {**WORKFLOW, **sections}
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# --- an input changed in place -----------------------------------------------------------------

def test_a_scan_store_rewritten_in_place_is_not_up_to_date(tmp_path):
    """The cache key of a store read in place follows its chunk files (sizes, mtimes), not the
    root directory's mtime, which a chunk rewritten inside it does not change."""
    import os

    import zarr

    from emscale.runner import run_workflow
    from emscale.store import ChunkPolicy
    from emscale.workflow import validate_workflow

    scan = tmp_path / "s.zarr"
    write_scan(synth_eels((12, 10), channels=96, seed=3), scan, policy=ChunkPolicy(0.01))
    wf = validate_workflow({**WORKFLOW, "input": str(scan), "output": str(tmp_path / "out")})
    first = run_workflow(wf, until="preprocess", echo=lambda *a: None)
    assert first.ran == ["preprocess"]
    assert run_workflow(wf, until="preprocess", echo=lambda *a: None).skipped == ["preprocess"]
    root_mtime = os.stat(scan).st_mtime_ns
    signal = zarr.open_array(str(scan / "signal"), mode="r+")
    signal[0, 0] = signal[0, 0] + 100  # one chunk rewritten in place
    assert os.stat(scan).st_mtime_ns == root_mtime  # what the old key looked at
    again = run_workflow(wf, until="preprocess", echo=lambda *a: None)
    assert again.ran == ["preprocess"]


# --- a full disk, then space freed -------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 300 kB that the test can grow (``remount``); skipped where mounting is not
    allowed (not root)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def grow(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    yield mnt, grow
    subprocess.run(["umount", "-l", str(mnt)])


# a small workflow run once as it should go: the fault tests' results must equal it
FAULT_WORKFLOW = {**WORKFLOW, "train": {**WORKFLOW["train"], "epochs": 2, "tile": 8}}


@pytest.fixture(scope="module")
def raw_input(tmp_path_factory):
    """The fault tests' input: a 32 x 32 x 128 EELS scan as a raw .npy (each run ingests it, so
    its scan stage writes too); every fault test checks it is byte-identical afterwards."""
    path = tmp_path_factory.mktemp("raw") / "scan.npy"
    np.save(path, synth_eels((32, 32), channels=128, anomaly=True, seed=1)["signal"].values)
    return path


def fault_workflow(raw_input, out) -> dict:
    return {**FAULT_WORKFLOW, "input": str(raw_input), "output": str(out)}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, local_client, raw_input):
    from emscale.runner import run_workflow
    from emscale.workflow import validate_workflow

    out = tmp_path_factory.mktemp("clean") / "out"
    return run_workflow(validate_workflow(fault_workflow(raw_input, out)), echo=lambda *a: None)


@pytest.fixture
def input_unchanged(raw_input):
    """Checks, after the test, that the fault left the input as it was."""
    from emscale.ingest import sha256_of

    before = sha256_of(raw_input)
    yield raw_input
    assert sha256_of(raw_input) == before, f"{raw_input} changed"


def assert_same_results(result, clean) -> None:
    from emscale.results import ResultsStore

    done, ref = ResultsStore(result.results), ResultsStore(clean.results)
    for stage, name in (("encode", "latent"), ("anomaly", "anomaly_score"), ("cluster", "phase")):
        np.testing.assert_array_equal(done.open_stage(stage)[name].values,
                                      ref.open_stage(stage)[name].values)


STAGES = ("scan", "preprocess", "pca", "train", "encode", "anomaly", "cluster", "report")
BLOCKWISE = ("preprocess", "pca", "encode", "anomaly", "cluster")


def test_a_full_disk_in_each_stage_then_freed_resumes_identical(small_disk, clean_run,
                                                                input_unchanged):
    """Before each stage the output's disk is made exactly as large as what it holds; the stage
    fails with one line naming the output and saying what was kept; with space freed the rerun
    finishes the stage, and the results at the end equal a run that never failed."""
    import os
    import subprocess

    from emscale.errors import OutputError
    from emscale.runner import run_workflow
    from emscale.workflow import validate_workflow

    mnt, grow = small_disk
    grow("64m")
    wf = validate_workflow(fault_workflow(input_unchanged, mnt / "out"))
    failed = []
    for stage in STAGES:
        st = os.statvfs(mnt)
        used_kib = (st.f_blocks - st.f_bfree) * st.f_frsize // 1024
        # (size=0 would mean no limit at all: one page at least)
        subprocess.run(["mount", "-o", f"remount,size={max(used_kib, 4)}k", str(mnt)],
                       check=True)
        try:
            run_workflow(wf, until=stage, echo=lambda *a: None)
        except OutputError as exc:
            message = str(exc)
            assert message.startswith(f"output {mnt / 'out'}") and "No space left on device" in \
                message and ("rerun to resume" in message or "nothing was written" in message), \
                message
            failed.append(stage)
        grow("64m")
        result = run_workflow(wf, until=stage, echo=lambda *a: None)
        assert result.ran[-1] == stage or stage not in failed
    assert failed == list(STAGES), failed  # the disk was full in every stage, and said so
    assert not list(mnt.rglob("*.partial-*"))
    assert_same_results(result, clean_run)


def test_a_worker_killed_in_each_blockwise_stage_changes_nothing(tmp_path, local_client,
                                                                 clean_run, input_unchanged):
    """A worker process SIGKILLed as each blockwise stage starts (one worker, then the other's
    replacement, and so on): its nanny starts another, the lost tasks run again, and the
    results equal a run without the kills."""
    import os
    import signal

    from emscale.runner import run_workflow
    from emscale.workflow import validate_workflow

    killed = {}

    def echo(message):
        stage = message[1:].split("]")[0]
        if stage in BLOCKWISE and stage not in killed:
            local_client.wait_for_workers(2, timeout=60)  # the last one's replacement is up
            pids = sorted(local_client.run(os.getpid).values())
            killed[stage] = pids[len(killed) % 2]
            os.kill(killed[stage], signal.SIGKILL)

    result = run_workflow(validate_workflow(fault_workflow(input_unchanged, tmp_path / "out")),
                          echo=echo)
    assert list(killed) == list(BLOCKWISE)
    local_client.wait_for_workers(2, timeout=60)
    assert not set(killed.values()) & set(local_client.run(os.getpid).values())
    assert_same_results(result, clean_run)


def test_a_run_killed_in_each_stage_resumes_identical(tmp_path, clean_run, input_unchanged):
    """``emscale run`` SIGKILLed (its client, scheduler and workers) as each stage starts, one
    stage after another: every restart resumes what the killed one left, and the run that
    finally finishes equals a run that was never killed (the restarts have one worker, the clean
    run two: the results do not depend on the worker count either)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump(fault_workflow(input_unchanged, tmp_path / "out")))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    command = [sys.executable, "-m", "emscale", "run", str(wf), "--dashboard-address", "none",
               "--workers", "1"]
    for stage in STAGES:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=env, start_new_session=True)
        said = []
        for line in proc.stdout:
            said.append(line)
            if line.startswith(f"[{stage}]"):
                break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert said and said[-1].startswith(f"[{stage}]"), f"not killed in {stage}: {said}"
        # the stages the earlier restarts finished were not done again
        redone = [line for line in said if line.split("]")[0][1:] in
                  STAGES[:max(0, STAGES.index(stage) - 1)] and "skipped" not in line]
        assert not redone, said
    from emscale.runner import run_workflow
    from emscale.workflow import load_workflow

    result = run_workflow(load_workflow(wf), echo=lambda *a: None)
    assert result.ran == ["report"]
    assert_same_results(result, clean_run)


# --- processes and clusters --------------------------------------------------------------------

def test_ctrl_c_says_interrupted_in_one_line(tmp_path):
    """SIGINT during a stage: exit 130 and one line, without distributed's cancellation noise
    (a worker's CancelledError warnings, asyncio's never-retrieved AllExit traceback)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    wf = workflow(tmp_path, synth={"kind": "eels", "shape": [32, 32], "channels": 128},
                  train={**WORKFLOW["train"], "epochs": 50, "tile": 8})
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "emscale", "run", wf, "--output",
                             str(tmp_path / "out"), "--dashboard-address", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    said = ""
    while "[train]" not in said:
        line = proc.stdout.readline()
        assert line, f"the run ended before training: {said}"
        said += line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip() == "emscale: interrupted", err


def test_a_line_scan_gets_its_anomaly_map(tmp_path):
    """A scan of one row went through every stage and then crashed in the report (a contour
    needs two rows); its maps now fill the axes instead of drawing a hairline. (A whole run of a
    1 x 400 scan, by hand: every stage and the report.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import xarray as xr

    from emscale.report import _anomalies

    flags = np.zeros((1, 256), bool)
    flags[0, 100:110] = True
    an = xr.Dataset({"anomaly": (("y", "x"), flags, {"threshold": 2.5, "method": "combined",
                                                     "calibration": "robust"}),
                     "anomaly_score": (("y", "x"), np.where(flags, 5.0, 0.0))})
    figures = []
    _anomalies(lambda name, title, fig, caption="": figures.append(fig), plt, None, None, None,
               an, None, {})
    (fig,) = figures
    assert fig.axes[0].get_aspect() == "auto"
    assert fig.axes[0].get_title() == "anomaly score; 3.91% flagged"


def test_a_stage_group_with_a_damaged_or_lost_chunk_names_it(tmp_path):
    """A results group's chunk changed in place fails its checksum, and the runner names the
    file; the group says it holds every chunk, so one lost is named too (zarr would read NaN or
    0 that the next stages take for data); both with the stage to redo."""
    import dask.array as da
    import xarray as xr

    from emscale.errors import StoreError
    from emscale.results import ResultsStore

    store = ResultsStore(tmp_path / "results.zarr")
    codes = da.from_array(np.arange(12 * 10 * 2, dtype=np.float32).reshape(12, 10, 2),
                          chunks=(4, 10, 2))
    store.write_stage("encode", xr.Dataset({"latent": (("y", "x", "k"), codes)}),
                      registry={})
    np.testing.assert_array_equal(store.open_stage("encode", registry={})["latent"].values,
                                  codes.compute())
    chunk = tmp_path / "results.zarr" / "encode" / "latent" / "c" / "1" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 1  # changed in place: its CRC-32C tells (Zarr names no file)
    chunk.write_bytes(bytes(raw))
    from emscale.runner import _checksums_named

    with pytest.raises(StoreError, match=r"latent/c/1/0/0: chunk \(1, 0, 0\) "
                                         r"\(pixels y 4:8, x 0:10\): its checksum does not match.*"
                                         r"--force encode"), _checksums_named(store, ("encode",)):
        store.open_stage("encode", registry={})["latent"].values
    chunk.unlink()
    with pytest.raises(StoreError, match=r"latent/c/1/0/0: chunk \(1, 0, 0\) of the encode "
                                         r"stage's latent is missing.*--force encode"):
        store.open_stage("encode", registry={})


def test_legitimate_layouts_still_pass(tmp_path, scan_store):
    """What the overlap checks must not refuse: a scan store kept as OUT/scan.zarr (the raw file
    deleted after a first run) read in place, --overwrite of a store through a link, or of an
    empty directory."""
    import shutil

    from emscale.atomic import check_output_free
    from emscale.runner import preflight
    from emscale.workflow import validate_workflow

    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(scan_store, out / "scan.zarr")
    preflight(validate_workflow({**WORKFLOW, "input": str(out / "scan.zarr"), "output": str(out)}))
    (tmp_path / "link.zarr").symlink_to(scan_store)
    check_output_free(tmp_path / "link.zarr", overwrite=True)
    (tmp_path / "empty").mkdir()
    check_output_free(tmp_path / "empty", overwrite=True)


def test_a_permission_error_is_the_outputs_only_on_its_files(tmp_path):
    import errno

    from emscale.errors import output_failure

    out = tmp_path / "s.zarr"
    denied = errno.EACCES
    assert output_failure(PermissionError(denied, "Permission denied", str(tmp_path / "raw.npy")),
                          out) is None  # an input that cannot be read: not an output error
    mine = output_failure(PermissionError(denied, "Permission denied",
                                          str(tmp_path / "s.zarr.partial-1234" / "zarr.json")), out)
    assert mine is not None and str(mine).startswith(f"output {out}: cannot write")
    full = output_failure(OSError(errno.ENOSPC, "No space left on device"), out)
    assert "No space left on device" in str(full) and "nothing was written there" in str(full)


def test_a_file_system_without_locks_runs_unlocked(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from emscale.runner import output_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="emscale.runner"), output_lock(tmp_path):
        pass
    assert "has no locks" in caplog.text
