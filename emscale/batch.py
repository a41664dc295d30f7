"""``emscale batch`` and ``emscale status``: many scans through one workflow, with a ledger.

The ledger is an SQLite file (``OUTPUT/ledger.sqlite`` by default) with one row per scan: its
state (``pending``, ``running``, ``done``, ``failed``), the error of a failure, start and finish
times, seconds, output directory and the workflow's hash. A rerun skips the scans done with the
same workflow, retries the failed ones and those left ``running`` by a killed batch. One failing
scan never stops the others: its error is recorded and the batch goes on. Scans run one after
another on the same cluster (each scan's stages are the parallel part).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from emscale.config import utc_now
from emscale.errors import ConfigError, EmscaleError

log = logging.getLogger(__name__)

STATES = ("pending", "running", "done", "failed")



@dataclass
class Entry:
    scan: str
    state: str
    output: str
    error: str | None
    started: str | None
    finished: str | None
    seconds: float | None
    workflow_hash: str | None


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS scans (scan TEXT PRIMARY KEY, state TEXT NOT "
                       "NULL, output TEXT, error TEXT, started TEXT, finished TEXT, seconds REAL, "
                       "workflow_hash TEXT)")

    def _connect(self):
        return sqlite3.connect(self.path, timeout=30)

    def get(self, scan: str) -> Entry | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM scans WHERE scan = ?", (scan,)).fetchone()
        return Entry(*row) if row else None

    def set(self, scan: str, **fields) -> None:
        entry = self.get(scan)
        values = {**(vars(entry) if entry else {"scan": scan, "state": "pending", "output": None,
                                                 "error": None, "started": None, "finished": None,
                                                 "seconds": None, "workflow_hash": None}),
                  **fields}
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO scans VALUES (:scan, :state, :output, :error, "
                       ":started, :finished, :seconds, :workflow_hash)", values)

    def entries(self) -> list[Entry]:
        if not self.path.exists():
            return []
        with closing(self._connect()) as db:
            return [Entry(*r) for r in db.execute("SELECT * FROM scans ORDER BY scan")]


def list_scans(source: str | Path) -> list[Path]:
    """The scans of a directory (its entries: scan stores and raw files, not hidden ones) or of a
    manifest file (one path per line, relative to the manifest; ``#`` starts a comment)."""
    source = Path(source)
    if source.is_dir():
        return sorted(p for p in source.iterdir() if not p.name.startswith("."))
    if source.is_file():
        scans = []
        for line in source.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                p = Path(line)
                scans.append(p if p.is_absolute() else source.parent / p)
        return scans
    raise ConfigError(f"{source}: no such manifest file or directory")


def output_names(scans: list[Path]) -> dict[Path, str]:
    """Each scan's output directory name: its file name without the format's extension
    (``x.v1.zarr`` -> ``x.v1``); where two scans would share one (``x.npy`` and ``x.zarr``, or
    ``a/x.npy`` and ``b/x.npy``), each gets a short hash of its resolved path appended, so no two
    scans ever write into one directory. Leading dots are dropped: no hidden output."""
    stems = {}
    for scan in scans:
        stem = (scan.stem if scan.suffix else scan.name).lstrip(".") or "scan"
        stems[scan] = stem
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {scan: stem if counts[stem] == 1 else with_path_hash(stem, scan)
            for scan, stem in stems.items()}


def with_path_hash(stem: str, scan: Path) -> str:
    return f"{stem}-{hashlib.sha256(str(scan.resolve()).encode()).hexdigest()[:8]}"


def batch_plan(source, workflow_path, output_root: Path | None = None):
    """(the workflow, the outputs' root, the scans) of a batch, checked before a cluster starts:
    the workflow file, the scan list, an output root outside the scan directory."""
    from emscale.workflow import load_workflow

    base = load_workflow(workflow_path, input=Path("batch"))  # the input is set per scan
    root = Path(output_root or base.output)
    if Path(source).is_dir() and root.resolve().is_relative_to(Path(source).resolve()):
        # outputs among the scans would be the next run's scans (and could replace one)
        raise ConfigError(f"output: {root} lies inside the scan directory {source}; choose an "
                          "output outside it")
    return base, root, list_scans(source)


def run_batch(source, workflow_path, *, output_root: Path | None = None,
              ledger_path: Path | None = None, echo=print) -> dict[str, list[str]]:
    """Run the workflow on every scan of ``source``; returns the scans by outcome (done, failed,
    skipped). The scans' outputs are ``OUTPUT_ROOT/<scan name>``."""
    from emscale.runner import run_workflow
    from emscale.workflow import load_workflow

    base, root, scans = batch_plan(source, workflow_path, output_root)
    ledger = Ledger(ledger_path or root / "ledger.sqlite")
    whash = base.section_hash("preprocess", "pca", "train", "encode", "anomaly", "cluster")
    names = output_names(scans)
    # directories the ledger gave out (to scans run before, under any naming): never shared
    taken = {e.scan: Path(e.output) for e in ledger.entries() if e.output}
    outcome: dict[str, list[str]] = {"done": [], "failed": [], "skipped": []}
    for scan in scans:
        key = str(scan.resolve())
        entry = ledger.get(key)
        if entry and entry.state == "done" and entry.workflow_hash == whash:
            outcome["skipped"].append(key)
            echo(f"[batch] {scan.name}: done before, skipped")
            continue
        # a scan run before keeps its directory, even if the list around it changed; a new one
        # gets a name no other scan of the ledger holds
        out = Path(entry.output) if entry and entry.output else root / names[scan]
        if key not in taken and out in taken.values():
            out = root / with_path_hash(names[scan], scan)
        taken[key] = out
        ledger.set(key, state="running", output=str(out), error=None, started=utc_now(),
                   finished=None, seconds=None, workflow_hash=whash)
        echo(f"[batch] {scan.name}: running -> {out}")
        t0 = time.perf_counter()
        try:
            wf = load_workflow(workflow_path, input=scan, output=out)
            run_workflow(wf, echo=lambda msg: echo(f"  {msg}"))
        except Exception as exc:  # one scan's failure must not stop the others
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:2000]
            ledger.set(key, state="failed", error=message, finished=utc_now(),
                       seconds=time.perf_counter() - t0)
            outcome["failed"].append(key)
            echo(f"[batch] {scan.name}: FAILED: {message}")
            # the traceback is in the scan's own log (OUTPUT/emscale.log); a bug's also here
            if not isinstance(exc, EmscaleError):
                log.exception("batch: %s failed", scan)
            continue
        ledger.set(key, state="done", finished=utc_now(), seconds=time.perf_counter() - t0)
        outcome["done"].append(key)
    echo(f"[batch] {len(scans)} scans: {len(outcome['done'])} done, {len(outcome['failed'])} "
         f"failed, {len(outcome['skipped'])} skipped (done before); ledger {ledger.path}")
    return outcome


def status_table(ledger_path: Path) -> str:
    ledger_path = Path(ledger_path)
    if ledger_path.is_dir():  # a batch's output directory
        ledger_path = ledger_path / "ledger.sqlite"
    if not ledger_path.exists():
        raise ConfigError(f"{ledger_path}: no ledger (run emscale batch first)")
    entries = Ledger(ledger_path).entries()
    lines = [f"{'state':<9}{'seconds':>9}  scan  (error)"]
    for e in entries:
        secs = f"{e.seconds:.1f}" if e.seconds is not None else "-"
        lines.append(f"{e.state:<9}{secs:>9}  {e.scan}" + (f"  ({e.error})" if e.error else ""))
    counts = {s: sum(e.state == s for e in entries) for s in STATES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
