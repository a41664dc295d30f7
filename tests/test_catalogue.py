"""The catalogue of bad input (issue 17): every kind of broken raw file, damaged store, wrong
workflow or cluster file, hostile name or path and unwritable disk a user has met, in one table,
each refused the same way. The command line runs in-process and each case must give: exit code
1; one line on stderr, ``emscale: error: ...``, naming the file, chunk or field; an error
emscale wrote for it (not a library's exception passed through); no traceback; every input
byte-identical afterwards; no output that looks complete and no ``*.partial-*`` left; and no
cluster started (every case is refused before one: milliseconds each).

Faults during a run (a killed run, worker or batch, a disk that fills, Ctrl-C) are real runs in
``test_bad_input.py``, ``test_resume.py`` and ``test_batch.py``.

``python tests/test_catalogue.py`` prints the catalogue as a table: case, error line, whether
the inputs are unchanged, the state of the output."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from emscale.cli import main
from emscale.store import ChunkPolicy, write_scan
from emscale.synth.eels import synth_eels

GROUPS = ("raw files", "stores", "workflows", "cluster files", "names and paths",
          "disk and permissions")

# a small workflow that would run on the catalogue's scan (12 x 10 pixels, 96 channels)
WORKFLOW = {
    "train": {"latent_dim": 3, "widths": [32, 16], "epochs": 1, "tile": 4, "threads": 1},
    "pca": {"n_components": 4},
    "cluster": {"k_range": [2, 3], "n_init": 1},
}


@dataclass
class Attempt:
    """A command that must be refused: the message its error line must hold, the paths that
    must be byte-identical afterwards and those that must not exist."""

    args: list
    message: str
    inputs: list = field(default_factory=list)
    absent: list = field(default_factory=list)
    after: Callable[[], None] | None = None  # undoes what the case set up outside its directory


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    build: Callable[[Path, Path], Attempt]  # (a fresh directory, the shared scan store)

    def __str__(self):
        return f"{self.group}: {self.name}"


CASES: list[Case] = []


def case(group: str, name: str):
    def register(build):
        CASES.append(Case(group, name, build))
        return build
    return register


def digest(path: Path) -> str:
    """A file's or a directory tree's content (names and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def write_workflow(tmp: Path, name: str = "wf.yaml", **sections) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump({**WORKFLOW, **sections}))
    return path


def run_on(tmp: Path, scan: Path, wf: Path, message: str, *extra, inputs=()) -> Attempt:
    out = tmp / "out"
    return Attempt(["run", wf, "--input", scan, "--output", out, *extra], message,
                   inputs=[scan, wf, *inputs], absent=[out])


def ingest_of(tmp: Path, raw: Path, message: str, *extra) -> Attempt:
    return Attempt(["ingest", raw, tmp / "s.zarr", *extra], message, inputs=[raw],
                   absent=[tmp / "s.zarr"])


def small_scan(path: Path, channels: int = 96, seed: int = 3) -> Path:
    """A 12 x 10 scan in chunks of 4 x 10 pixels."""
    write_scan(synth_eels((12, 10), channels=channels, seed=seed), path,
               policy=ChunkPolicy(target_mib=0.015))
    return path


def copied_scan(tmp: Path, scan: Path) -> Path:
    import shutil

    return Path(shutil.copytree(scan, tmp / "scan.zarr"))


# --- raw files: emscale ingest RAW OUT ---------------------------------------------------------

RAW_ARRAYS = [  # (case, array, what the error says after "raw.npy: ")
    ("Fortran-ordered .npy", lambda: np.asfortranarray(np.ones((4, 5, 32), np.uint16)),
     "Fortran-ordered .npy"),
    ("complex values", lambda: np.ones((4, 5, 32), np.complex64),
     "values of type complex64 cannot be counts"),
    ("int64 counts that do not fit int32", lambda: np.full((4, 5, 32), 2**40, np.int64),
     "pixels y 0:4, x 0:5 hold values 1099511627776..1099511627776 that do not fit int32"),
    ("uint64 counts that do not fit uint32", lambda: np.full((4, 5, 32), 2**33, np.uint64),
     "pixels y 0:4, x 0:5 hold values 8589934592..8589934592 that do not fit uint32"),
    ("NaN and inf values", lambda: np.where(np.arange(4 * 5 * 32).reshape(4, 5, 32) == 70,
                                            np.nan, 1.0).astype(np.float32),
     "1 NaN/inf values, first in chunk (0, 0): y 0:4, x 0:5"),
    ("strings", lambda: np.full((4, 5, 32), "a"), "values of type <U1 cannot be counts"),
    ("a 2-D array", lambda: np.ones((20, 30), np.uint16), "2-D array (shape (20, 30)); need 3-D"),
    ("a 5-D array", lambda: np.ones((2, 3, 4, 5, 6), np.uint16), "5-D array"),
    ("a scan with no pixels", lambda: np.ones((0, 5, 8), np.uint16), "empty scan"),
    ("a single spectrum", lambda: np.ones(64, np.uint16), "1-D array"),
]

for _name, _make, _message in RAW_ARRAYS:
    def _build(tmp, scan, make=_make, message=_message):
        np.save(tmp / "raw.npy", make())
        return ingest_of(tmp, tmp / "raw.npy", "raw.npy: " + message)
    case("raw files", _name)(_build)


RAW_BYTES = [  # (case, file name, its bytes, what the error says after the name)
    ("an empty .npy", "raw.npy", b"", "empty file"),
    ("a .npy whose header is garbage", "raw.npy", b"\x93NUMPY garbage", "not a readable .npy"),
    ("a text file named .npy", "raw.npy", b"pixel,energy,count\n1,2,3\n", "not a readable .npy"),
    ("an unknown extension", "raw.xyz", b"hello", "unknown format"),
    ("random bytes named .h5", "raw.h5", bytes(range(256)) * 16, ""),
    ("random bytes named .dm4", "raw.dm4", bytes(range(256)) * 16, ""),
    ("random bytes named .hspy", "raw.hspy", bytes(range(256)) * 16, ""),
    ("random bytes named .emd", "raw.emd", bytes(range(256)) * 16, ""),
]

for _name, _file, _content, _message in RAW_BYTES:
    def _build(tmp, scan, file=_file, content=_content, message=_message):
        (tmp / file).write_bytes(content)
        return ingest_of(tmp, tmp / file, f"{file}: {message}")
    case("raw files", _name)(_build)


@case("raw files", "a missing file")
def _(tmp, scan):
    return ingest_of(tmp, tmp / "missing.npy", "missing.npy: no such file")


@case("raw files", "a truncated .npy")
def _(tmp, scan):
    np.save(tmp / "raw.npy", np.ones((8, 8, 64), np.uint16))
    data = (tmp / "raw.npy").read_bytes()
    (tmp / "raw.npy").write_bytes(data[: len(data) // 2])
    return ingest_of(tmp, tmp / "raw.npy", "raw.npy: truncated")


@case("raw files", "a .npy of Python objects (a pickle)")
def _(tmp, scan):
    data = np.empty((2, 2, 4), dtype=object)
    data[...] = {"a": 1}
    np.save(tmp / "raw.npy", data, allow_pickle=True)
    return ingest_of(tmp, tmp / "raw.npy", "raw.npy: ")


@case("raw files", "a directory that is not a Zarr store")
def _(tmp, scan):
    (tmp / "raw").mkdir()
    (tmp / "raw" / "notes.txt").write_text("not a scan")
    return ingest_of(tmp, tmp / "raw", "raw: not a Zarr store (no zarr.json in it)")


@case("raw files", "a Zarr group without an array")
def _(tmp, scan):
    import zarr

    zarr.open_group(str(tmp / "raw.zarr"), mode="w", zarr_format=3)
    return ingest_of(tmp, tmp / "raw.zarr", "raw.zarr: ")


@case("raw files", "a negative --chunk-mib")
def _(tmp, scan):
    np.save(tmp / "raw.npy", np.ones((4, 5, 32), np.uint16))
    return ingest_of(tmp, tmp / "raw.npy", "chunk_mib", "--chunk-mib", "-1")


# --- stores: scan stores and results stores ---------------------------------------------------

def _chunk(store: Path, index=(0, 0, 0)) -> Path:
    return store / "signal" / "c" / "/".join(map(str, index))


@case("stores", "a scan store that lost a chunk file (run)")
def _(tmp, scan):
    store = copied_scan(tmp, scan)
    _chunk(store, (1, 0, 0)).unlink()
    return run_on(tmp, store, write_workflow(tmp), "signal/c/1/0/0: chunk (1, 0, 0) (pixels y ")


@case("stores", "a scan store that lost a chunk file (re-ingest)")
def _(tmp, scan):
    store = copied_scan(tmp, scan)
    _chunk(store, (1, 0, 0)).unlink()
    return ingest_of(tmp, store, "signal/c/1/0/0: chunk (1, 0, 0) (pixels y ")


@case("stores", "a chunk changed in place (its checksum)")
def _(tmp, scan):
    store = copied_scan(tmp, scan)
    data = bytearray(_chunk(store).read_bytes())
    data[40] ^= 0xFF
    _chunk(store).write_bytes(bytes(data))
    return ingest_of(tmp, store, "signal/c/0/0/0: chunk (0, 0, 0) (pixels y 0:")


@case("stores", "an energy axis changed in place")
def _(tmp, scan):
    store = copied_scan(tmp, scan)
    (chunk,) = (store / "energy" / "c").iterdir()
    data = bytearray(chunk.read_bytes())
    data[20] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return run_on(tmp, store, write_workflow(tmp), "energy/c/0: its checksum does not match")


@case("stores", "a truncated chunk")
def _(tmp, scan):
    store = copied_scan(tmp, scan)
    data = _chunk(store).read_bytes()
    _chunk(store).write_bytes(data[: len(data) // 2])
    return ingest_of(tmp, store, "signal/c/0/0/0: chunk (0, 0, 0)")


@case("stores", "a store whose zarr.json is not JSON")
def _(tmp, scan):
    store = copied_scan(tmp, scan)
    (store / "zarr.json").write_text("{ this is not json")
    return run_on(tmp, store, write_workflow(tmp), "scan.zarr: its zarr.json is not valid JSON")


@case("stores", "a store without its signal array")
def _(tmp, scan):
    import shutil

    store = copied_scan(tmp, scan)
    shutil.rmtree(store / "signal")
    return run_on(tmp, store, write_workflow(tmp), "scan.zarr: Zarr group with 5 arrays and no "
                  "'signal'")


@case("stores", "a Zarr v2 store")
def _(tmp, scan):
    import zarr

    zarr.create_array(str(tmp / "v2.zarr"), shape=(4, 5, 32), chunks=(2, 5, 32), dtype="u2",
                      zarr_format=2)
    return Attempt(["info", tmp / "v2.zarr"], "v2.zarr: a Zarr v2 store; scan stores are Zarr v3",
                   inputs=[tmp / "v2.zarr"])


@case("stores", "info on a store that does not exist")
def _(tmp, scan):
    return Attempt(["info", tmp / "missing.zarr"], "missing.zarr: no such scan store")


@case("stores", "info on a plain file")
def _(tmp, scan):
    (tmp / "notes.txt").write_text("hello")
    return Attempt(["info", tmp / "notes.txt"], "notes.txt: a file, not a Zarr store",
                   inputs=[tmp / "notes.txt"])


@case("stores", "a reference store that lost a chunk file")
def _(tmp, scan):
    ref = copied_scan(tmp, scan)
    _chunk(ref, (1, 0, 0)).unlink()
    wf = write_workflow(tmp, anomaly={"reference": str(ref)})
    return run_on(tmp, scan, wf, "signal/c/1/0/0: chunk (1, 0, 0)", inputs=[ref])


# --- workflows: emscale run WORKFLOW --input SCAN, refused before a cluster starts --------------

WORKFLOW_SECTIONS = [  # (case, sections replacing the small workflow's, the field named)
    ("a misspelt field", {"train": {"latent": 3}}, "train.latent: "),
    ("an unknown section", {"colour": "red"}, "colour: "),
    ("text where a number goes", {"train": {"epochs": "ten"}}, "train.epochs: "),
    ("zero epochs", {"train": {"epochs": 0}}, "train.epochs: "),
    ("a negative latent size", {"train": {"latent_dim": -1}}, "train.latent_dim: "),
    ("a layer of width 0", {"train": {"widths": [64, 0]}}, "train.widths"),
    ("an unknown model", {"train": {"model": "transformer"}}, "train.model: "),
    ("zero PCA components", {"pca": {"n_components": 0}}, "pca.n_components: "),
    ("an unknown clustering method", {"cluster": {"method": "dbscan"}}, "cluster.method: "),
    ("an anomaly quantile above 1", {"anomaly": {"quantile": 1.5}}, "anomaly.quantile: "),
    ("k_range the wrong way round", {"cluster": {"k_range": [5, 2]}}, "cluster.k_range: "),
    ("k_range beyond the pixels", {"cluster": {"k_range": [2, 500]}},
     "cluster.k_range: [2, 500] reaches beyond the 120 pixels of the 12 x 10 scan"),
    ("n_clusters beyond the pixels", {"cluster": {"n_clusters": 500}},
     "cluster.n_clusters: 500 is more than the 120 pixels"),
    ("a negative seed", {"seed": -1}, "seed: "),
    ("a seed beyond 32 bits", {"seed": 2**40}, "seed: "),
    ("an unknown preprocessing step", {"preprocess": {"steps": [{"step": "smooth"}]}},
     "preprocess.steps[0].step: "),
    ("a step option that does not exist",
     {"preprocess": {"steps": [{"step": "normalize", "method": "total"}]}},
     "preprocess.steps[0].method: "),
    ("a 4D-STEM step on a spectrum image", {"preprocess": {"steps": [{"step": "circular_crop"}]}},
     "preprocess.steps[0].step: 'circular_crop' does not apply to a spectrum scan"),
    ("a crop outside the energy axis",
     {"preprocess": {"steps": [{"step": "crop", "start": 900, "stop": 950}]}},
     "preprocess.steps"),
    ("more PCA components than features", {"pca": {"n_components": 97}},
     "pca.n_components: 97 is more than the 96 features"),
    ("a latent size as large as the features",
     {"train": {"latent_dim": 96, "tile": 4}, "pca": {"n_components": 96}},
     "train.latent_dim: 96 is not fewer than the 96 features"),
    ("training tiles as large as the scan", {"train": {**WORKFLOW["train"], "tile": 12}},
     "train.tile: 12 leaves the 12 x 10 scan a single tile"),
    ("a normal region outside the scan", {"anomaly": {"normal_region": [0, 48, 0, 16]}},
     "normal_region: [0, 48, 0, 16] reaches outside the 12 x 10 scan"),
]

for _name, _sections, _message in WORKFLOW_SECTIONS:
    def _build(tmp, scan, sections=_sections, message=_message):
        wf = write_workflow(tmp, **sections)
        return run_on(tmp, scan, wf, f"{wf}: {message}" if message.endswith(": ") else message)
    case("workflows", _name)(_build)


WORKFLOW_TEXTS = [  # (case, the file's text, what the error says after its name)
    ("a YAML syntax error", "train:\n  epochs: [1,\n",
     "wf.yaml: line 3, column 1: not a valid workflow: while parsing a flow node expected the "
     "node content"),
    ("a Python object tag", "train: !!python/object/apply:os.system ['touch pwned']\n",
     "wf.yaml: line 1, column 8: not a valid workflow: could not determine a constructor for "
     "the tag 'tag:yaml.org,2002:python/object/apply:os.system' (plain YAML only"),
    ("an empty file", "", "wf.yaml: (top level): give exactly one of input"),
    ("a list, not a mapping", "- train\n- pca\n", "wf.yaml: "),
]

for _name, _text, _message in WORKFLOW_TEXTS:
    def _build(tmp, scan, text=_text, message=_message):
        (tmp / "wf.yaml").write_text(text)
        return Attempt(["run", tmp / "wf.yaml", "--output", tmp / "out"], message,
                       inputs=[tmp / "wf.yaml"], absent=[tmp / "out", tmp / "pwned"])
    case("workflows", _name)(_build)


@case("workflows", "a workflow file that does not exist")
def _(tmp, scan):
    return Attempt(["run", tmp / "nope.yaml", "--input", scan], "nope.yaml: cannot read the "
                   "workflow (No such file or directory)", inputs=[scan], absent=[tmp / "out"])


@case("workflows", "--force of a stage that does not exist")
def _(tmp, scan):
    return run_on(tmp, scan, write_workflow(tmp), "--force: unknown stage 'bogus'",
                  "--force", "bogus")


@case("workflows", "an input that does not exist")
def _(tmp, scan):
    return run_on(tmp, tmp / "nope.zarr", write_workflow(tmp), "nope.zarr: no such file")


@case("workflows", "a reference recorded otherwise (128 channels against 96)")
def _(tmp, scan):
    ref = small_scan(tmp / "ref.zarr", channels=128, seed=4)
    wf = write_workflow(tmp, anomaly={"reference": str(ref)})
    return run_on(tmp, scan, wf, f"anomaly.reference: {ref} has signal {{'energy': 128}}, the "
                  "scan {'energy': 96}", inputs=[ref])


@case("workflows", "a reference that does not exist")
def _(tmp, scan):
    wf = write_workflow(tmp, anomaly={"reference": str(tmp / "ref.zarr")})
    return run_on(tmp, scan, wf, f"anomaly.reference: {tmp / 'ref.zarr'}: no such file")


@case("workflows", "the gram solver on 20000 channels (a 1.5 GiB matrix)")
def _(tmp, scan):
    np.save(tmp / "wide.npy", np.ones((4, 4, 20000), np.uint16))
    wf = write_workflow(tmp, preprocess={"steps": []})
    return run_on(tmp, tmp / "wide.npy", wf,
                  "pca.solver: gram needs a 20000 x 20000 scatter matrix")


# --- cluster files: emscale run --cluster FILE -------------------------------------------------

CLUSTER_FILES = [  # (case, the cluster file, the field named)
    ("an unknown cluster type", {"type": "sge"}, "type: "),
    ("an address cluster without an address", {"type": "address"}, "address"),
    ("zero Slurm jobs", {"type": "slurm", "jobs": 0}, "jobs: "),
    ("a misspelt field", {"workers": 2, "colour": 1}, "colour: "),
    ("zero workers", {"workers": 0}, "workers: "),
    ("a walltime with a line break", {"type": "slurm", "walltime": "01:00:00\ntouch pwned"},
     "walltime: "),
    ("a partition with a space", {"type": "slurm", "queue": "night now"}, "queue: "),
    ("an account with a quote", {"type": "slurm", "account": "lab'; rm -rf ~"}, "account: "),
    ("a directive with a line break",
     {"type": "slurm", "job_extra_directives": ["--gres=gpu:1\ntouch pwned"]},
     "job_extra_directives"),
    ("an address that is not host:port", {"type": "address", "address": "tcp://nowhere"},
     "address: 'tcp://nowhere' is not host:port"),
    ("an address where nothing listens", {"type": "address", "address": "tcp://127.0.0.1:9"},
     "address: nothing listens at tcp://127.0.0.1:9"),
    ("TLS certificates in memory for an existing scheduler",
     {"type": "address", "address": "tls://127.0.0.1:9", "tls": "auto"}, "tls: auto "),
    ("TLS with a plain TCP address",
     {"type": "address", "address": "tcp://127.0.0.1:9", "tls": "/nowhere"},
     "address: tcp://127.0.0.1:9 is plain TCP while tls is set"),
    ("a TLS directory without certificates", {"tls": "/nowhere"},
     "tls: /nowhere lacks ca.pem, cert.pem, key.pem (make them with 'emscale tls DIR')"),
    ("a host name that does not resolve",
     {"type": "address", "address": "tcp://no-such-host.invalid:8786"},
     "address: 'no-such-host.invalid' cannot be resolved"),
]

for _name, _data, _message in CLUSTER_FILES:
    def _build(tmp, scan, data=_data, message=_message):
        path = tmp / "cluster.yaml"
        path.write_text(yaml.safe_dump(data))
        attempt = run_on(tmp, scan, write_workflow(tmp), message, "--cluster", path,
                         inputs=[path])
        attempt.absent.append(tmp / "pwned")
        return attempt
    case("cluster files", _name)(_build)


@case("cluster files", "a cluster file that does not exist")
def _(tmp, scan):
    return run_on(tmp, scan, write_workflow(tmp), "nope.yaml: cannot read the cluster file (No "
                  "such file or directory)", "--cluster", tmp / "nope.yaml")


@case("cluster files", "a memory limit that is not a size")
def _(tmp, scan):
    return run_on(tmp, scan, write_workflow(tmp), "--memory-limit: 'lots' is not a size",
                  "--memory-limit", "lots")


# --- names and paths ----------------------------------------------------------------------------

def _raw(tmp: Path, name: str = "raw.npy") -> Path:
    np.save(tmp / name, np.ones((4, 5, 32), np.uint16))
    return tmp / name


@case("names and paths", "ingest into the input's own directory with --overwrite")
def _(tmp, scan):
    data = tmp / "data"
    data.mkdir()
    raw = _raw(data)
    np.save(data / "sibling.npy", np.ones(3))  # a neighbour that --overwrite once deleted
    return Attempt(["ingest", raw, data, "--overwrite"], "holds the input", inputs=[data])


@case("names and paths", "ingest into a path inside a Zarr input")
def _(tmp, scan):
    return Attempt(["ingest", scan, scan / "copy.zarr"], "lies inside the input", inputs=[scan],
                   absent=[scan / "copy.zarr"])


@case("names and paths", "ingest onto itself")
def _(tmp, scan):
    store = copied_scan(tmp, scan)
    return Attempt(["ingest", store, store, "--overwrite"], "scan.zarr", inputs=[store])


@case("names and paths", "--overwrite of a directory that is not a store")
def _(tmp, scan):
    notes = tmp / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    return Attempt(["ingest", _raw(tmp), notes, "--overwrite"], "is not a Zarr store",
                   inputs=[notes, tmp / "raw.npy"])


@case("names and paths", "ingest onto an existing store without --overwrite")
def _(tmp, scan):
    store = copied_scan(tmp, scan)
    return Attempt(["ingest", _raw(tmp), store], "scan.zarr", inputs=[store, tmp / "raw.npy"])


@case("names and paths", "a run's output inside its input store")
def _(tmp, scan):
    return Attempt(["run", write_workflow(tmp), "--input", scan, "--output", scan / "results"],
                   "lies inside the input", inputs=[scan], absent=[scan / "results"])


@case("names and paths", "a run's input where the run writes its results")
def _(tmp, scan):
    out = tmp / "out"
    (out / "results.zarr").mkdir(parents=True)
    raw = _raw(out / "results.zarr")
    return Attempt(["run", write_workflow(tmp), "--input", raw, "--output", out],
                   "lies where the run writes its results.zarr", inputs=[raw])


@case("names and paths", "a run's output that is a file")
def _(tmp, scan):
    (tmp / "out").write_text("a file")
    return Attempt(["run", write_workflow(tmp), "--input", scan, "--output", tmp / "out"],
                   "out", inputs=[scan, tmp / "out"])


@case("names and paths", "a batch output inside the scan directory")
def _(tmp, scan):
    (tmp / "scans").mkdir()
    _raw(tmp / "scans", "a.npy")
    return Attempt(["batch", tmp / "scans", "--workflow", write_workflow(tmp), "--output",
                    tmp / "scans" / "out"], "lies inside the scan directory",
                   inputs=[tmp / "scans"])


def _submit(tmp: Path, message: str, *, workflow: str = "wf.yaml", begin: str = "now",
            output: str = "out", cluster: dict | None = None) -> Attempt:
    wf = write_workflow(tmp, workflow, synth={"kind": "eels", "shape": [16, 16]})
    path = tmp / "slurm.yaml"
    path.write_text(yaml.safe_dump(cluster or {"type": "slurm", "memory": "2GiB"}))
    return Attempt(["submit", wf, "--cluster", path, "--begin", begin, "--output", tmp / output],
                   message, inputs=[wf, path], absent=[tmp / "out", tmp / "pwned"])


INJECT = "x\ntouch pwned\n"
case("names and paths", "submit: a line break in the workflow's name")(
    lambda tmp, scan: _submit(tmp, "workflow: ", workflow=f"wf{INJECT}.yaml"))
case("names and paths", "submit: a command in --begin")(
    lambda tmp, scan: _submit(tmp, "--begin: ", begin=INJECT))
case("names and paths", "submit: a line break in the output path")(
    lambda tmp, scan: _submit(tmp, "output: ", output=f"out{INJECT}"))
case("names and paths", "submit: a double quote in the output path")(
    lambda tmp, scan: _submit(tmp, "a double quote or backslash cannot be passed",
                              output='o"ut'))
case("names and paths", "submit: an address cluster")(
    lambda tmp, scan: _submit(tmp, "submit: the cluster file must be",
                              cluster={"type": "address", "address": "tcp://h:8786"}))


# --- disk and permissions -----------------------------------------------------------------------

@case("disk and permissions", "an output that another run holds")
def _(tmp, scan):
    from emscale.runner import output_lock

    out = tmp / "out"
    out.mkdir()
    lock = output_lock(out)
    lock.__enter__()
    return Attempt(["run", write_workflow(tmp), "--input", scan, "--output", out],
                   f"output: {out} is in use by another emscale run (pid ", inputs=[scan],
                   absent=[out / "results.zarr"], after=lambda: lock.__exit__(None, None, None))


@case("disk and permissions", "an output under a file")
def _(tmp, scan):
    (tmp / "file").write_text("a file")
    return Attempt(["run", write_workflow(tmp), "--input", scan, "--output", tmp / "file" / "out"],
                   "file", inputs=[scan, tmp / "file"])


def _tmpfs(tmp: Path, size: str = "300k", read_only: bool = False) -> tuple[Path, Callable]:
    """A small file system of its own at ``tmp/disk`` (and its unmount); skipped where mounting
    is not allowed (not root)."""
    import subprocess

    mnt = tmp / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    (mnt / "data").mkdir()
    if read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    return mnt, lambda: subprocess.run(["umount", "-l", str(mnt)])


@case("disk and permissions", "a run's output on a read-only file system")
def _(tmp, scan):
    mnt, unmount = _tmpfs(tmp, read_only=True)
    out = mnt / "data" / "out"
    return Attempt(["run", write_workflow(tmp), "--input", scan, "--output", out],
                   f"output: {out} cannot be written ({mnt / 'data'} is read-only",
                   inputs=[scan], after=unmount)


@case("disk and permissions", "ingest onto a read-only file system")
def _(tmp, scan):
    mnt, unmount = _tmpfs(tmp, read_only=True)
    return Attempt(["ingest", scan, mnt / "s.zarr"], f"output {mnt / 's.zarr'}: cannot write",
                   inputs=[scan], absent=[mnt / "s.zarr"], after=unmount)


@case("disk and permissions", "ingest onto a disk that fills")
def _(tmp, scan):
    mnt, unmount = _tmpfs(tmp, size="300k")
    raw = tmp / "raw.npy"
    np.save(raw, np.random.default_rng(0).integers(0, 2**16, (32, 32, 256), np.uint16))
    return Attempt(["ingest", raw, mnt / "s.zarr"], f"output {mnt / 's.zarr'}: cannot write",
                   inputs=[raw], absent=[mnt / "s.zarr"], after=unmount)


@case("disk and permissions", "an output in a directory without write permission")
def _(tmp, scan):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: the read-only case is test_bad_input's tmpfs")
    (tmp / "locked").mkdir(mode=0o555)
    return Attempt(["run", write_workflow(tmp), "--input", scan, "--output",
                    tmp / "locked" / "out"], "locked", inputs=[scan])


# --- the checks ----------------------------------------------------------------------------------

@dataclass
class Outcome:
    code: int
    err: str
    out: str
    inputs_unchanged: bool
    written: list


def attempt(c: Case, tmp: Path, scan: Path) -> tuple[Attempt, Outcome]:
    a = c.build(tmp, scan)
    before = {p: digest(p) for p in a.inputs if p.exists()}
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main([str(x) for x in a.args])
    except BaseException:
        if a.after is not None:
            a.after()
        raise
    unchanged = all(p.exists() and digest(p) == d for p, d in before.items())
    written = [p for p in a.absent if p.exists()]
    written += [p for p in tmp.rglob("*.partial-*")]
    if a.after is not None:
        a.after()
    return a, Outcome(code, err.getvalue(), out.getvalue(), unchanged, written)


@pytest.fixture(scope="module")
def scan_store(tmp_path_factory):
    return small_scan(tmp_path_factory.mktemp("scan") / "s.zarr")


@pytest.mark.parametrize("c", CASES, ids=str)
def test_refused_in_one_line_naming_it_and_nothing_harmed(c, tmp_path, scan_store):
    before = digest(scan_store)
    a, o = attempt(c, tmp_path, scan_store)
    assert o.code == 1, (o.err, o.out)
    assert o.err.startswith("emscale: error: ") and o.err.count("\n") == 1, o.err
    assert a.message in o.err, o.err
    assert "--debug for the traceback" not in o.err, "not an error emscale wrote: " + o.err
    assert "Traceback" not in o.err + o.out
    assert "dashboard:" not in o.out, "refused only once a cluster had started"
    assert o.inputs_unchanged and digest(scan_store) == before
    assert not o.written, o.written


def test_the_catalogue_has_every_group_and_fifty_kinds():
    assert {c.group for c in CASES} == set(GROUPS)
    assert len(CASES) >= 50 and len({str(c) for c in CASES}) == len(CASES)


def table() -> str:
    """The catalogue run once, as a Markdown table."""
    rows = ["| group | case | error line | inputs unchanged | output |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as root:
        scan = small_scan(Path(root) / "s.zarr")
        for i, c in enumerate(CASES):
            tmp = Path(root) / f"case{i}"
            tmp.mkdir()
            try:
                _, o = attempt(c, tmp, scan)
            except pytest.skip.Exception as exc:
                rows.append(f"| {c.group} | {c.name} | skipped: {exc} | | |")
                continue
            line = o.err.strip().replace(root, "…").replace("|", "\\|").replace("\n", " ⏎ ")
            state = "none" if not o.written else "written: " + ", ".join(p.name for p in o.written)
            rows.append(f"| {c.group} | {c.name} | exit {o.code}: `{line}` | "
                        f"{'yes' if o.inputs_unchanged else 'NO'} | {state} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(print(table()))
