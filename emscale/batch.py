"""``emscale batch`` and ``emscale status``: many scans through one workflow, with a ledger.

The ledger is an SQLite file (``OUTPUT/ledger.sqlite`` by default) with one row per scan: its
state (``pending``, ``running``, ``done``, ``failed``), the error of a failure, start and finish
times, seconds, output directory and the workflow's hash, and for a scan done its figures: K (and
how it was chosen), the share of pixels flagged anomalous and its report's path. A rerun skips the
scans done with the same workflow, retries the failed ones and those left ``running`` by a killed
batch; with nothing to do it starts no cluster. One failing scan never stops the others: its error
is recorded and the batch goes on. Scans run one after another on the same cluster (each scan's
stages are the parallel part). ``index.html`` beside the ledger, rewritten whenever a scan starts
or ends, shows the ledger as a page with a link to each report.
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass, fields
from pathlib import Path

from emscale.config import utc_now
from emscale.errors import ConfigError, EmscaleError

log = logging.getLogger(__name__)

STATES = ("pending", "running", "done", "failed")
# where a bare ``emscale status`` looks: the shipped batch workflow's output (read from
# workflows/overnight-batch.yaml when there is one here), this directory, the workflows' default
SHIPPED_BATCH_WORKFLOW = Path("workflows/overnight-batch.yaml")
SHIPPED_BATCH_OUTPUT = Path("results/overnight")


@dataclass
class Entry:
    scan: str
    state: str
    output: str | None = None
    error: str | None = None
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    workflow_hash: str | None = None
    # a done scan's figures, read from its results store as it ends (None: not recorded, e.g. a
    # ledger written before they were, or a workflow without the stage)
    k: int | None = None
    k_chosen_by: str | None = None
    flagged: float | None = None  # fraction of the scan's pixels flagged anomalous
    report: str | None = None


COLUMNS = {"scan": "TEXT PRIMARY KEY", "state": "TEXT NOT NULL", "output": "TEXT",
           "error": "TEXT", "started": "TEXT", "finished": "TEXT", "seconds": "REAL",
           "workflow_hash": "TEXT", "k": "INTEGER", "k_chosen_by": "TEXT", "flagged": "REAL",
           "report": "TEXT"}
assert list(COLUMNS) == [f.name for f in fields(Entry)]


class Ledger:
    """The ledger file; ``readonly`` (``emscale status``) neither creates nor migrates it, so a
    ledger another batch is writing, or one on read-only storage, reads as it is."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS scans (scan TEXT PRIMARY KEY, state TEXT NOT "
                       "NULL, output TEXT, error TEXT, started TEXT, finished TEXT, seconds REAL, "
                       "workflow_hash TEXT)")
            # a ledger of an older emscale gets the newer columns (NULL in its rows)
            have = {row[1] for row in db.execute("PRAGMA table_info(scans)")}
            for name, kind in COLUMNS.items():
                if name not in have:
                    db.execute(f"ALTER TABLE scans ADD COLUMN {name} {kind}")

    def _connect(self):
        if self.readonly:
            return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        return sqlite3.connect(self.path, timeout=30)

    def _select(self, db, where: str = "", args: tuple = ()) -> list[Entry]:
        have = [row[1] for row in db.execute("PRAGMA table_info(scans)") if row[1] in COLUMNS]
        rows = db.execute(f"SELECT {', '.join(have)} FROM scans {where} ORDER BY scan", args)
        return [Entry(**dict(zip(have, row))) for row in rows]

    def get(self, scan: str) -> Entry | None:
        with closing(self._connect()) as db:
            found = self._select(db, "WHERE scan = ?", (scan,))
        return found[0] if found else None

    def set(self, scan: str, **values) -> None:
        entry = self.get(scan) or Entry(scan=scan, state="pending")
        row = {**vars(entry), **values}
        with closing(self._connect()) as db, db:
            db.execute(f"INSERT OR REPLACE INTO scans ({', '.join(COLUMNS)}) VALUES "
                       f"({', '.join(':' + c for c in COLUMNS)})", row)

    def entries(self) -> list[Entry]:
        if not self.path.exists():
            return []
        with closing(self._connect()) as db:
            return self._select(db)


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


def _workflow_hash(base) -> str:
    return base.section_hash("preprocess", "pca", "train", "encode", "anomaly", "cluster")


def _done_before(entry: Entry | None, whash: str) -> bool:
    return entry is not None and entry.state == "done" and entry.workflow_hash == whash


def batch_todo(source, workflow_path, output_root: Path | None = None,
               ledger_path: Path | None = None) -> list[Path]:
    """The scans a batch would run (not done before with the same workflow), decided from the
    ledger alone: with none, ``emscale batch`` starts no cluster. Checks what ``batch_plan``
    checks."""
    base, root, scans = batch_plan(source, workflow_path, output_root)
    path = Path(ledger_path or root / "ledger.sqlite")
    whash = _workflow_hash(base)
    done = {e.scan for e in Ledger(path, readonly=True).entries()
            if _done_before(e, whash)} if path.exists() else set()
    return [scan for scan in scans if str(scan.resolve()) not in done]


def scan_figures(out: Path) -> dict:
    """A finished run's K (and how it was chosen), the fraction of its pixels flagged anomalous
    and its report, as the stages stored them: the cluster stage's attrs and its exact count of
    flagged pixels (``anomaly_mean_signal``'s ``pixels``); only without a cluster stage is the
    anomaly map counted. What is not there is None; a figure never fails a scan."""
    import zarr

    out = Path(out).absolute()  # the ledger is read from other directories (emscale status)
    figures = {"k": None, "k_chosen_by": None, "flagged": None, "report": None}
    if (out / "report" / "index.html").exists():
        figures["report"] = str(out / "report" / "index.html")
    results = out / "results.zarr"
    try:
        if (results / "cluster" / "zarr.json").exists():
            group = zarr.open_group(str(results / "cluster"), mode="r", zarr_format=3)
            phase = group.attrs.get("phase") or {}
            figures["k"], figures["k_chosen_by"] = phase.get("n_clusters"), phase.get("chosen_by")
            if "anomaly_mean_signal" in group:
                ny, nx = group["phase"].shape[:2]
                figures["flagged"] = group["anomaly_mean_signal"].attrs["pixels"] / (ny * nx)
        if figures["flagged"] is None and (results / "anomaly" / "anomaly").is_dir():
            import dask.array as da

            flags = da.from_zarr(str(results / "anomaly" / "anomaly"))
            figures["flagged"] = int(flags.sum().compute()) / flags.size
    except Exception as exc:  # the scan is done; a figure missing is no reason to fail it
        log.warning("%s: K or %% flagged not read from the results: %s", out, exc)
    return figures


def run_batch(source, workflow_path, *, output_root: Path | None = None,
              ledger_path: Path | None = None, echo=print) -> dict[str, list[str]]:
    """Run the workflow on every scan of ``source``; returns the scans by outcome (done, failed,
    skipped). The scans' outputs are ``OUTPUT_ROOT/<scan name>``. ``index.html`` beside the
    ledger is rewritten as each scan starts and ends."""
    from emscale.runner import run_workflow
    from emscale.workflow import load_workflow

    base, root, scans = batch_plan(source, workflow_path, output_root)
    ledger = Ledger(ledger_path or root / "ledger.sqlite")
    whash = _workflow_hash(base)
    names = output_names(scans)
    # directories the ledger gave out (to scans run before, under any naming): never shared
    taken = {e.scan: Path(e.output) for e in ledger.entries() if e.output}
    outcome: dict[str, list[str]] = {"done": [], "failed": [], "skipped": []}
    for scan in scans:
        key = str(scan.resolve())
        entry = ledger.get(key)
        if _done_before(entry, whash):
            if entry.report is None and entry.output:  # done by an emscale without figures
                ledger.set(key, **scan_figures(Path(entry.output)))
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
                   finished=None, seconds=None, workflow_hash=whash, k=None, k_chosen_by=None,
                   flagged=None, report=None)
        write_index(ledger.path)
        echo(f"[batch] {scan.name}: running -> {out}")
        t0 = time.perf_counter()
        try:
            wf = load_workflow(workflow_path, input=scan, output=out)
            run_workflow(wf, echo=lambda msg: echo(f"  {msg}"))
        except Exception as exc:  # one scan's failure must not stop the others
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:2000]
            ledger.set(key, state="failed", error=message, finished=utc_now(),
                       seconds=time.perf_counter() - t0)
            write_index(ledger.path)
            outcome["failed"].append(key)
            echo(f"[batch] {scan.name}: FAILED: {message}")
            # the traceback is in the scan's own log (OUTPUT/emscale.log); a bug's also here
            if not isinstance(exc, EmscaleError):
                log.exception("batch: %s failed", scan)
            continue
        seconds = time.perf_counter() - t0
        figures = scan_figures(out)
        ledger.set(key, state="done", finished=utc_now(), seconds=seconds, **figures)
        write_index(ledger.path)
        outcome["done"].append(key)
        done = Entry(scan=key, state="done", seconds=seconds, **figures)
        echo(f"[batch] {scan.name}: done in {_duration(seconds)}, K = {_k(done)}, "
             f"{_flagged(done)} flagged")
    index = write_index(ledger.path)
    echo(f"[batch] {len(scans)} scans: {len(outcome['done'])} done, {len(outcome['failed'])} "
         f"failed, {len(outcome['skipped'])} skipped (done before); ledger {ledger.path}, "
         f"overview {index}")
    return outcome


# --- the overview: emscale status and index.html ---------------------------------------------

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _k(e: Entry) -> str:
    return "-" if e.k is None else str(e.k)


def _flagged(e: Entry) -> str:
    return "-" if e.flagged is None else f"{100 * e.flagged:.2f}%"


def _scan_names(entries: list[Entry]) -> dict[str, str]:
    """Each scan's file name, or its whole path where two scans of the ledger share a name."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[Path(e.scan).name] = counts.get(Path(e.scan).name, 0) + 1
    return {e.scan: Path(e.scan).name if counts[Path(e.scan).name] == 1 else e.scan
            for e in entries}


def _counts(entries: list[Entry]) -> str:
    return ", ".join(f"{sum(e.state == s for e in entries)} {s}"
                     for s in ("done", "failed", "running", "pending"))


def find_ledger(ledger: Path | None = None) -> Path:
    """The ledger ``emscale status`` reads: the one named (a file, or a batch's output
    directory), else the first found of ./ledger.sqlite, the shipped batch workflow's (its
    ``output:``, results/overnight) and emscale-output/ledger.sqlite (the workflows' default
    output); an error saying where it looked when there is none."""
    if ledger is not None:
        ledger = Path(ledger)
        path = ledger / "ledger.sqlite" if ledger.is_dir() else ledger
        if not path.is_file():
            raise ConfigError(f"{path}: no ledger (run emscale batch first)")
        return path
    shipped = SHIPPED_BATCH_OUTPUT
    if SHIPPED_BATCH_WORKFLOW.is_file():  # its output, as edited here
        import yaml

        try:
            shipped = Path(yaml.safe_load(SHIPPED_BATCH_WORKFLOW.read_text())["output"])
        except Exception:  # a broken file is the batch's to report; look at the default
            pass
    candidates = list(dict.fromkeys([Path("ledger.sqlite"), shipped / "ledger.sqlite",
                                     Path("emscale-output/ledger.sqlite")]))
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"no ledger in {Path.cwd()}: looked for "
                      f"{', '.join(str(p) for p in candidates)} (the second is the output of "
                      f"{SHIPPED_BATCH_WORKFLOW}); name the ledger or the batch's output "
                      "directory: emscale status PATH")


def status_table(ledger_path: Path) -> str:
    """The ledger as a table: one row per scan with its state, K, % flagged, time, and its
    report (done) or error (failed); the counts per state last."""
    ledger_path = find_ledger(ledger_path)
    entries = Ledger(ledger_path, readonly=True).entries()
    names = _scan_names(entries)
    width = max([4, *(len(n) for n in names.values())])
    lines = [f"ledger {ledger_path}, overview {ledger_path.parent / 'index.html'}",
             f"{'scan':<{width}}  {'state':<7}  {'K':>3}  {'flagged':>7}  {'time':>10}  "
             "report / error"]
    for e in entries:
        where = e.error if e.state == "failed" else _shown_path(e.report) if e.report else ""
        if e.state == "running":
            where = f"since {_minute(e.started)} UTC"
        lines.append(f"{names[e.scan]:<{width}}  {e.state:<7}  {_k(e):>3}  {_flagged(e):>7}  "
                     f"{_duration(e.seconds):>10}  {where or ''}".rstrip())
    lines.append(_counts(entries))
    return "\n".join(lines)


def _shown_path(path: str) -> str:
    """A path relative to the current directory when it lies below it, else as stored."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


INDEX_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
p.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 0.45em 0.8em; border-bottom: 1px solid #ddd;
         vertical-align: top; }
th { background: #f3f3f3; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.path { color: #777; font-size: 0.8em; overflow-wrap: anywhere; }
td.scan { min-width: 12em; max-width: 22em; }
.state { display: inline-block; padding: 0.1em 0.6em; border-radius: 0.8em; font-size: 0.9em;
         font-weight: 600; }
.done { background: #dff3e3; color: #1b6e2e; }
.failed { background: #fbe0e0; color: #a11; }
.running { background: #e0ecfb; color: #1a4f94; }
.pending { background: #eee; color: #555; }
.how { color: #666; font-size: 0.85em; white-space: normal; }
td.error { font-family: ui-monospace, monospace; font-size: 0.85em; color: #a11;
           min-width: 16em; max-width: 48em; overflow-wrap: anywhere; }
"""


def _minute(stamp: str | None) -> str:
    """An ISO timestamp to the minute, for a person: ``2026-12-04 12:36``."""
    return stamp.replace("T", " ")[:16] if stamp else ""


def write_index(ledger_path: Path) -> Path:
    """``index.html`` beside the ledger: one row per scan (state, K, % flagged, time, a link
    to its report relative to the page, so the directory can be copied, its error when
    failed). Written to a temporary file and renamed: a reader never sees half a page."""
    ledger_path = Path(ledger_path)
    path = ledger_path.parent / "index.html"
    entries = Ledger(ledger_path, readonly=True).entries()
    names = _scan_names(entries)
    esc = html.escape
    rows = []
    for e in entries:
        report = ""
        if e.report:
            href = Path(os.path.relpath(Path(e.report).resolve(), path.parent.resolve()))
            report = f'<a href="{esc(href.as_posix())}">report</a>'
        how = f'<div class="how">{esc(str(e.k_chosen_by))}</div>' if e.k_chosen_by else ""
        when = _minute(e.finished) or (f"since {_minute(e.started)}" if e.started else "")
        rows.append(
            f'<tr><td class="scan"><b>{esc(names[e.scan])}</b><br>'
            f'<span class="path">{esc(e.scan)}</span>'
            f'</td><td><span class="state {esc(e.state)}">{esc(e.state)}</span></td>'
            f'<td class="num">{_k(e)}{how}</td><td class="num">{_flagged(e)}</td>'
            f'<td class="num">{_duration(e.seconds)}</td><td class="num">{esc(when)}</td>'
            f'<td>{report}</td><td class="error">{esc(e.error or "")}</td></tr>')
    running = any(e.state == "running" for e in entries)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
{'<meta http-equiv="refresh" content="60">' if running else ''}
<title>emscale batch: {_counts(entries)}</title><style>{INDEX_STYLE}</style></head>
<body><h1>emscale batch: {len(entries)} scans</h1>
<p class="sub">{esc(_counts(entries))}; updated {esc(_minute(utc_now()))} UTC; ledger
<code>{esc(ledger_path.name)}</code>{' (reloads every minute while a scan runs)' if running else ''}</p>
<table><thead><tr><th>scan</th><th>state</th><th class="num">K</th>
<th class="num">flagged</th><th class="num">time</th><th class="num">finished (UTC)</th>
<th>report</th><th>error</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
