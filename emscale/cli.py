"""The ``emscale`` command line (DESIGN.md section 7). Spellings here are stable once released.

Errors print as one line (``emscale: error: ...``) with a non-zero exit; ``--debug`` shows the
traceback. Library code logs; only this module prints.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from emscale.errors import ConfigError, EmscaleError

app = typer.Typer(
    name="emscale",
    help="Unsupervised phase mapping of large electron-microscopy scans (EELS/EDS spectrum images "
    "and 4D-STEM) on a Dask cluster: run a workflow file (preprocess, PCA, autoencoder, "
    "anomaly scoring, phase clustering, report) on a laptop or a Slurm/PBS cluster, overnight "
    "batches with a ledger, ingest raw files into chunked Zarr scan stores, synthetic scans with "
    "ground truth, benchmarks.",
    no_args_is_help=True,
    rich_markup_mode="markdown",  # a docstring's lines form one paragraph
    add_completion=False,
    pretty_exceptions_enable=False,
)
synth_app = typer.Typer(
    help="Generate a synthetic scan with ground truth (clean signal, phase labels), chunk by chunk.",
    no_args_is_help=True,
)
bench_app = typer.Typer(help="Benchmarks that print their figures (and write JSON with --json).",
                        no_args_is_help=True)
app.add_typer(synth_app, name="synth")
app.add_typer(bench_app, name="bench")

OVERWRITE_REMEDY = "choose another path, remove it, or pass --overwrite"
CHUNK_HELP = ("Target navigation-block size in MiB of float32 (policy: 32-128 MiB for real scans; "
              "smaller values give more chunks on small scans).")


DASHBOARD_HELP = ("Where the Dask dashboard listens, HOST:PORT or :PORT (default: the cluster "
                  "file's, else :8787; a busy port is replaced by a free one); a port without a "
                  "host listens on the loopback only (0.0.0.0:PORT: every interface); 'none' "
                  "turns it off. From a laptop: ssh -J LOGIN_NODE -L 8787:localhost:PORT NODE, "
                  "then open http://localhost:8787/status.")


def _dashboard_line(client, cfg) -> str:
    return f"dashboard: {client.dashboard_link if cfg.dashboard_address is not None else 'off'}"


def _dashboard(cfg, address: str | None):
    """The cluster file with ``--dashboard-address`` applied."""
    if address is None:
        return cfg
    return cfg.model_copy(update={"dashboard_address": None if address == "none" else address})


@app.callback()
def _global(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress messages (INFO)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and DEBUG logs on errors."),
) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # the terminal's level, whatever a log file takes
        handler.setLevel(level)
    # distributed configures its own logger (INFO: every worker start and stop) when imported
    import dask

    dask.config.set({"logging.distributed": "debug" if debug else "info" if verbose else "warning"})
    if not (verbose or debug):
        from emscale.quiet_logs import DropAfterCancel

        # after Ctrl-C, the client's cancelled gathers end in "Task exception was never retrieved"
        asyncio_log = logging.getLogger("asyncio")
        if not any(isinstance(f, DropAfterCancel) for f in asyncio_log.filters):
            asyncio_log.addFilter(DropAfterCancel())


STORE_CLEAN_HELP = ("Keep the float32 clean signal in the store (about 3x the disk of the "
                    "counts); without it it is regenerated from the generator's parameters when "
                    "read.")
LAYOUT_HELP = ("grains: Voronoi grains with mixed boundaries and a surface layer; bands: four "
               "equal bands of pure pixels, one phase each (groups of known phase).")


def _write_synthetic(make, out: Path, chunk_mib: float, overwrite: bool, **settings) -> None:
    """OUT checked first, then the scan ``make(**settings, policy=...)`` generates lazily,
    written chunk by chunk."""
    from emscale.atomic import check_output_free
    from emscale.store import write_scan

    check_output_free(out, overwrite, OVERWRITE_REMEDY)
    policy = _policy(chunk_mib)
    write_scan(make(policy=policy, **settings), out, policy=policy, overwrite=overwrite,
               progress=_progress())


def _policy(chunk_mib: float):
    from emscale.store import ChunkPolicy

    return ChunkPolicy.of(chunk_mib)


def _progress() -> bool:
    return sys.stderr.isatty()


@synth_app.command("eels")
def synth_eels_cmd(
    out: Path = typer.Argument(..., help="Output scan store (a new .zarr directory)."),
    shape: tuple[int, int] = typer.Option((64, 64), "--shape", help="Navigation size NY NX."),
    channels: int = typer.Option(1024, "--channels", help="Number of energy channels (480-800 eV)."),
    anomaly: bool = typer.Option(False, "--anomaly", help="Add anomalous regions (F contamination, "
                                 "beam damage) labelled -1."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same scan."),
    dose: float = typer.Option(50.0, "--dose", help="Mean counts per channel just above the Fe-L3 edge."),
    read_noise: float = typer.Option(1.0, "--read-noise", help="Gaussian read noise (counts, sd)."),
    layout: str = typer.Option("grains", "--layout", help=LAYOUT_HELP),
    chunk_mib: float = typer.Option(64.0, "--chunk-mib", help=CHUNK_HELP),
    store_clean: bool = typer.Option(False, "--store-clean", help=STORE_CLEAN_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Synthetic iron-oxide core-loss EELS: O-K and Fe-L2,3 edges, four phases (Fe2O3, FeO, Fe3O4,
    amorphous surface), thickness and chemical-shift variation, Poisson + read noise."""
    from emscale.synth.eels import synth_eels

    _write_synthetic(synth_eels, out, chunk_mib, overwrite, shape=shape, channels=channels,
                     anomaly=anomaly, seed=seed, dose=dose, read_noise=read_noise, layout=layout,
                     store_clean=store_clean)
    typer.echo(f"wrote {out}: spectrum image {shape[0]} x {shape[1]} x {channels}")


@synth_app.command("eds")
def synth_eds_cmd(
    out: Path = typer.Argument(..., help="Output scan store (a new .zarr directory)."),
    shape: tuple[int, int] = typer.Option((64, 64), "--shape", help="Navigation size NY NX."),
    channels: int = typer.Option(1024, "--channels", help="Number of energy channels (-0.2 to "
                                 "20 keV)."),
    anomaly: bool = typer.Option(False, "--anomaly", help="Add anomalous regions (Ga implanted "
                                 "by the FIB, silica particles) labelled -1."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same scan."),
    dose: float = typer.Option(1000.0, "--dose", help="Mean X-ray counts per spectrum."),
    layout: str = typer.Option("grains", "--layout", help=LAYOUT_HELP),
    chunk_mib: float = typer.Option(64.0, "--chunk-mib", help=CHUNK_HELP),
    store_clean: bool = typer.Option(False, "--store-clean", help=STORE_CLEAN_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Synthetic EDS of an aged stainless steel on a keV axis: austenite, sigma phase, M23C6
    carbide and a Cr2O3 surface layer; K and L lines with the detector's energy-dependent resolution,
    bremsstrahlung, low-energy absorption, thickness variation, Poisson counts."""
    from emscale.synth.eds import synth_eds

    _write_synthetic(synth_eds, out, chunk_mib, overwrite, shape=shape, channels=channels,
                     anomaly=anomaly, seed=seed, dose=dose, layout=layout, store_clean=store_clean)
    typer.echo(f"wrote {out}: EDS spectrum image {shape[0]} x {shape[1]} x {channels} (keV)")


@synth_app.command("4dstem")
def synth_4dstem_cmd(
    out: Path = typer.Argument(..., help="Output scan store (a new .zarr directory)."),
    shape: tuple[int, int] = typer.Option((64, 64), "--shape", help="Navigation size NY NX."),
    pattern: tuple[int, int] = typer.Option((64, 64), "--pattern", help="Pattern size KY KX (64-256)."),
    anomaly: bool = typer.Option(False, "--anomaly", help="Add anomalous regions labelled -1."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same scan."),
    dose: Optional[float] = typer.Option(None, "--dose", help="Mean electrons per pattern."),
    chunk_mib: float = typer.Option(64.0, "--chunk-mib", help=CHUNK_HELP),
    store_clean: bool = typer.Option(False, "--store-clean", help=STORE_CLEAN_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Synthetic 4D-STEM: a polycrystal of grains (two crystal phases, many orientations) with
    Bragg-disk patterns, amorphous and vacuum regions, thickness variation, Poisson noise."""
    from emscale.synth.diffraction import synth_diffraction

    _write_synthetic(synth_diffraction, out, chunk_mib, overwrite, shape=shape, pattern=pattern,
                     anomaly=anomaly, seed=seed, store_clean=store_clean,
                     **({} if dose is None else {"dose": dose}))
    typer.echo(f"wrote {out}: 4D-STEM {shape[0]} x {shape[1]} scan of {pattern[0]} x {pattern[1]} patterns")


@app.command("ingest")
def ingest_cmd(
    raw: Path = typer.Argument(..., help="Raw file: any rosettasciio format (dm3, dm4, emd, mib, bcf, "
                               "hspy, zspy, mrc, blo, ...), py4DSTEM/EMD .h5, .npy, or Zarr."),
    out: Path = typer.Argument(..., help="Output scan store (a new .zarr directory)."),
    kind: Optional[str] = typer.Option(None, "--kind", metavar="KIND",
                                       help="What the file holds, checked "
                                       "against its dimensions: spectrum (or eels, eds: also "
                                       "recorded as the signal type) for 3-D (y, x, energy), "
                                       "diffraction (or 4dstem) for 4-D (y, x, ky, kx)."),
    axis: Optional[list[str]] = typer.Option(None, "--axis", metavar="DIM:KEY=VALUE,...",
                                             help="Calibrate an axis (repeatable): DIM is y, x, "
                                             "energy or ky, kx (y,x: both); keys scale (step per "
                                             "pixel or channel), offset (the first one's value), "
                                             "units. E.g. --axis energy:scale=0.01,units=keV "
                                             "--axis y,x:scale=2.5,units=nm. Replaces "
                                             "the file's calibration of that axis (keys not given "
                                             "are kept); a raw array's axes are uncalibrated "
                                             "without it. Crop ranges of workflows are in these "
                                             "units."),
    chunk_mib: float = typer.Option(64.0, "--chunk-mib", help=CHUNK_HELP),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Keep NaN/inf values "
                                         "(preprocessing masks them) instead of refusing the file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the ingest report as JSON."),
) -> None:
    """Stream a raw file into a scan store chunk by chunk (bounded memory, input read-only),
    with calibrations as coordinates (the file's, or --axis) and the source's path, size and
    sha256 as provenance."""
    from emscale.atomic import check_output_free
    from emscale.ingest import ingest, parse_axis

    axes = [a for text in axis or [] for a in parse_axis(text)]
    check_output_free(out, overwrite, OVERWRITE_REMEDY, inputs=(raw,))
    report = ingest(raw, out, policy=_policy(chunk_mib), allow_nonfinite=allow_nonfinite,
                    axes=axes, kind=kind, overwrite=overwrite, progress=_progress())
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        stored = "" if report.stored_dtype == report.dtype else \
            f" (stored as {report.stored_dtype})"
        typer.echo(f"ingested {raw} ({report.format}) -> {out}: {report.kind} "
                   f"{' x '.join(map(str, report.shape))} {report.dtype}{stored}, "
                   f"{report.bytes_read / 1e6:.1f} MB in {report.seconds:.1f} s "
                   f"({report.mb_per_s:.0f} MB/s)")


@app.command("info")
def info_cmd(
    store: Path = typer.Argument(..., help="A scan store (.zarr directory)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Dims, shape, dtype, chunks, calibrations, size on disk and provenance of a scan store; or,
    for a results store (OUTPUT/results.zarr of emscale run), its stages and provenance."""
    from emscale.info import (
        describe_results,
        describe_store,
        format_description,
        format_results,
        is_results_store,
    )

    if is_results_store(store):
        desc = describe_results(store)
        text = format_results
    else:
        desc = describe_store(store)
        text = format_description
    typer.echo(json.dumps(desc, indent=2, default=str) if as_json else text(desc))


@app.command("run")
def run_cmd(
    workflow: Path = typer.Argument(..., help="The workflow file (YAML); see workflows/ for ready "
                                    "ones and `emscale defaults` for every field and default."),
    input: Optional[Path] = typer.Option(None, "--input", help="The scan (a scan store or a raw "
                                         "file to ingest); overrides the workflow's input/synth."),
    output: Optional[Path] = typer.Option(None, "--output", help="The results directory; overrides "
                                          "the workflow's output."),
    cluster_file: Optional[Path] = typer.Option(None, "--cluster", help="A cluster file (YAML; "
                                                "see cluster_configs/): local, slurm, pbs or an "
                                                "existing scheduler address. Default: a "
                                                "LocalCluster of --workers processes."),
    workers: int = typer.Option(2, "--workers", help="LocalCluster worker processes (without "
                                "--cluster)."),
    threads: int = typer.Option(1, "--threads", help="Threads per worker (without --cluster)."),
    memory_limit: str = typer.Option("4GiB", "--memory-limit", help="Memory limit per worker "
                                     "(without --cluster)."),
    force: list[str] = typer.Option([], "--force", help="Recompute this stage and everything "
                                    "after it (scan, preprocess, pca, train, encode, anomaly, "
                                    "cluster, report); repeatable."),
    dashboard_address: Optional[str] = typer.Option(None, "--dashboard-address",
                                                    help=DASHBOARD_HELP),
) -> None:
    """Run a workflow: scan, preprocess, PCA, training, encoding, anomaly scoring, phase
    clustering and the report, on a LocalCluster (default) or the cluster of --cluster. Stages
    whose results are already there with the same settings are skipped; the report's path is
    printed at the end."""
    from emscale.dask_cluster import (
        default_cluster_file,
        load_cluster_file,
        open_cluster,
        with_options,
        worker_jobs,
    )
    from emscale.runner import preflight, run_workflow
    from emscale.workflow import load_workflow

    wf = load_workflow(workflow, input=input, output=output)
    preflight(wf, tuple(force))  # refused before the cluster starts
    if cluster_file is not None:
        cfg = load_cluster_file(cluster_file)
    else:
        cfg = with_options(default_cluster_file(), {
            "workers": ("--workers", workers), "threads": ("--threads", threads),
            "memory": ("--memory-limit", memory_limit)})
    cfg = _dashboard(cfg, dashboard_address)
    with open_cluster(cfg) as (cluster, client):
        typer.echo(_dashboard_line(client, cfg))
        info = {"type": cfg.type, "workers": worker_jobs(client)}
        result = run_workflow(wf, force=tuple(force), echo=typer.echo, cluster_info=info)
    typer.echo(f"ran: {', '.join(result.ran) or 'nothing'}; skipped: "
               f"{', '.join(result.skipped) or 'nothing'}")
    from emscale.batch import scan_figures

    found = scan_figures(Path(result.results).parent)
    if found["k"] is not None:
        flagged = "" if found["flagged"] is None else f"; {100 * found['flagged']:.2f}% flagged"
        typer.echo(f"phases: K = {found['k']} ({found['k_chosen_by']}){flagged}")
    typer.echo(f"results: {result.results}")
    typer.echo(f"report: {result.report}")


@app.command("defaults")
def defaults_cmd() -> None:
    """Print every workflow field with its default and what it does, as a commented YAML
    workflow: copy what you need into your own file."""
    from emscale.workflow import defaults_yaml

    typer.echo(defaults_yaml(), nl=False)


@app.command("tls")
def tls_cmd(
    directory: Path = typer.Argument(..., help="Where to write ca.pem, cert.pem and key.pem "
                                     "(on storage every host of the cluster sees)."),
    days: int = typer.Option(365, "--days", help="How long the certificates are valid."),
) -> None:
    """Make the certificates of one cluster for TLS between its scheduler, workers and emscale:
    a new certificate authority and a certificate it signed. Name the directory in the cluster
    file (tls: DIR); start the scheduler and workers with --tls-ca-file DIR/ca.pem --tls-cert
    DIR/cert.pem --tls-key DIR/key.pem and a tls:// address."""
    from emscale.atomic import check_output_free
    from emscale.tls import FILES, make_certificates

    if days < 1:
        raise ConfigError(f"--days: {days} is not a positive number of days")
    for name in FILES:
        check_output_free(directory / name)
    make_certificates(directory, days)
    typer.echo(f"wrote {', '.join(str(directory / f) for f in FILES)}; in the cluster file: "
               f"tls: {directory.resolve()}")


@app.command("submit")
def submit_cmd(
    workflow: Path = typer.Argument(..., help="The workflow file (YAML)."),
    cluster_file: Path = typer.Option(..., "--cluster", help="The cluster file: slurm or pbs "
                                      "(workers as further jobs), or local (a LocalCluster "
                                      "inside the one Slurm job)."),
    begin: Optional[str] = typer.Option(None, "--begin", help="Start no earlier than this (Slurm "
                                        "--begin syntax, e.g. 22:00, now+1hour; PBS -a)."),
    output: Optional[Path] = typer.Option(None, "--output", help="The results directory; "
                                          "overrides the workflow's output."),
) -> None:
    """Write a batch script that runs `emscale run` as one job and submit it (sbatch or qsub);
    the script and the job's log go to the output directory."""
    from emscale.dask_cluster import load_cluster_file
    from emscale.submit import submit
    from emscale.workflow import load_workflow

    wf = load_workflow(workflow, output=output)
    cfg = load_cluster_file(cluster_file)
    job = submit(workflow, cluster_file, cfg, wf.output, begin=begin)
    typer.echo(f"submitted job {job}: {Path(wf.output) / 'submit.sh'}")


@app.command("batch")
def batch_cmd(
    source: Path = typer.Argument(..., help="A directory of scans (scan stores or raw files) or a "
                                  "manifest file (one path per line, # comments)."),
    workflow: Path = typer.Option(..., "--workflow", help="The workflow file run on every scan."),
    cluster_file: Optional[Path] = typer.Option(None, "--cluster", help="A cluster file (default: "
                                                "a LocalCluster of 2 worker processes)."),
    output: Optional[Path] = typer.Option(None, "--output", help="The root of the scans' outputs "
                                          "(default: the workflow's output); one directory each."),
    ledger: Optional[Path] = typer.Option(None, "--ledger", help="The ledger (default: "
                                          "OUTPUT/ledger.sqlite)."),
    dashboard_address: Optional[str] = typer.Option(None, "--dashboard-address",
                                                    help=DASHBOARD_HELP),
) -> None:
    """Run a workflow on many scans, one after another on one cluster, with a persistent ledger:
    done scans are skipped on a rerun (with none left to run, no cluster starts), a failing scan
    is recorded and the others go on; index.html beside the ledger shows every scan (state, K, %
    flagged, time, report, error), rewritten as each ends; a summary ends the run (exit 1 if any
    scan failed)."""
    from emscale.batch import batch_todo, run_batch
    from emscale.dask_cluster import (
        default_cluster_file,
        load_cluster_file,
        open_cluster,
    )

    todo = batch_todo(source, workflow, output, ledger)  # refused before the cluster starts
    cfg = load_cluster_file(cluster_file) if cluster_file else default_cluster_file()
    cfg = _dashboard(cfg, dashboard_address)
    if not todo:  # every scan done before with this workflow: the summary, no cluster
        typer.echo("[batch] nothing to run: every scan is done with this workflow")
        outcome = run_batch(source, workflow, output_root=output, ledger_path=ledger,
                            echo=typer.echo)
    else:
        with open_cluster(cfg) as (_cluster, client):
            typer.echo(_dashboard_line(client, cfg))
            outcome = run_batch(source, workflow, output_root=output, ledger_path=ledger,
                                echo=typer.echo)
    if outcome["failed"]:
        raise typer.Exit(1)


@app.command("export")
def export_cmd(
    results: Path = typer.Argument(..., help="A run's output directory, or its results.zarr."),
    to: str = typer.Option(..., "--to", metavar="FORMAT",
                           help="hspy (HyperSpy's HDF5: maps as Signal2D, stacks of maps "
                           "navigated by index like decomposition loadings, phase mean signals "
                           "and PCA components as Signal1D/2D stacks, the denoised scan with the "
                           "PCA and phases in its learning_results), py4dstem (one EMD 1.0 file "
                           "of py4DSTEM objects: DataCube, RealSlice, DiffractionSlice; 4D-STEM "
                           "only), tiff (ImageJ TIFFs with the pixel size: maps and pattern "
                           "stacks), png (pictures), npy (arrays; axes in export.json). zspy "
                           "needs a rosettasciio that writes Zarr 3."),
    stage: Optional[list[str]] = typer.Option(None, "--stage", help="Export only these stages "
                                              "(repeatable): preprocess, pca, encode, anomaly, "
                                              "cluster. Default: all the run wrote."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: "
                                       "export-FORMAT beside results.zarr)."),
    denoised: bool = typer.Option(True, "--denoised/--no-denoised", help="Include the denoised "
                                  "scan when the run wrote it (as large as the scan as float32; "
                                  "written chunk by chunk)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export there."),
) -> None:
    """Write a run's results as HyperSpy, py4DSTEM, TIFF, PNG or NumPy files with calibrated axes
    and units; export.json lists every file, its variable, dims and axes."""
    from emscale.export import export_results

    where = export_results(results, to, out, stages=tuple(stage) if stage else None,
                           denoised=denoised, overwrite=overwrite)
    files = json.loads((where / "export.json").read_text())
    names = {f["file"] for f in files["files"]}
    left = len(files["not_exported"])
    typer.echo(f"wrote {where}: {len(files['files'])} variables in {len(names)} "
               f"{to} file{'s' if len(names) != 1 else ''}"
               + (f" ({left} variable{'s' if left != 1 else ''} with no place in {to}: see "
                  "export.json)" if left else ""))


@app.command("status")
def status_cmd(
    ledger: Optional[Path] = typer.Argument(
        None, help="The batch ledger, or the batch's output directory (default: the first of "
        "./ledger.sqlite, the shipped workflows/overnight-batch.yaml's output "
        "results/overnight/ledger.sqlite, emscale-output/ledger.sqlite)."),
) -> None:
    """Every scan of a batch: its state (pending, running, done, failed), K, % of pixels flagged
    anomalous, time, and its report or its error; the same as the batch's index.html."""
    from emscale.batch import status_table

    typer.echo(status_table(ledger))


@bench_app.command("ingest")
def bench_ingest_cmd(
    size_gb: float = typer.Option(2.0, "--size-gb", help="Size of the generated raw .npy file (GB)."),
    workdir: Optional[Path] = typer.Option(None, "--dir", help="Where to write the raw file and the "
                                           "store (default: a temporary directory, removed after)."),
    chunk_mib: float = typer.Option(64.0, "--chunk-mib", help=CHUNK_HELP),
    cold: bool = typer.Option(True, "--cold/--warm", help="Evict the raw file from the page cache "
                              "before ingesting (read from disk) or keep it cached."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures to this file."),
) -> None:
    """Peak memory and throughput of a streamed ingest of a generated raw file (uint16 counts),
    against its limits measured in the same run: reading the raw file from disk (cold) and
    encoding the store's chunks with its codec on all cores."""
    from emscale.bench.ingest import run_ingest_bench

    result = run_ingest_bench(size_gb, workdir=workdir, chunk_mib=chunk_mib, cold=cold)
    typer.echo(result.table())
    if json_path:
        json_path.write_text(json.dumps(result.to_dict(), indent=2))


@bench_app.command("pca")
def bench_pca_cmd(
    store: Path = typer.Argument(..., help="A scan store (.zarr directory) to decompose."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures to this file."),
    methods: str = typer.Option(",".join(("gram", "randomized", "incremental", "hyperspy-svd",
                                          "hyperspy-pca", "sklearn-ipca-loop")), "--methods",
                                help="Comma-separated methods to run (emscale's solvers gram, "
                                "randomized, incremental; hyperspy-svd, hyperspy-pca and "
                                "sklearn-ipca-loop run in the client process)."),
    k: int = typer.Option(8, "--k", help="Number of components."),
    workers: int = typer.Option(2, "--workers", help="LocalCluster worker processes."),
    threads: int = typer.Option(1, "--threads", help="Threads per worker."),
    memory_limit: str = typer.Option("4GiB", "--memory-limit", help="Memory limit per worker."),
    tuned: bool = typer.Option(True, "--tuned/--untuned", help="emscale's worker environment "
                               "(malloc trim threshold, BLAS kernels) or distributed's defaults."),
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="A preprocessing chain as "
                                             "JSON (e.g. '[{\"step\": \"bin\", \"factor\": 2}]') fused "
                                             "into emscale's solvers and the reference; GB/s stay "
                                             "relative to the raw store."),
) -> None:
    """Time every PCA method on the same store and workers against the store's read+decompress
    floor (a dask sum), with peak worker memory and principal angles to exact PCA."""
    from emscale.bench.pca import run_pca_bench, write_json
    from emscale.errors import ConfigError

    steps = None
    if preprocess:
        try:
            steps = json.loads(preprocess)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--preprocess: not valid JSON ({exc})") from None
    result = run_pca_bench(store, methods=[m.strip() for m in methods.split(",") if m.strip()],
                           n_components=k, n_workers=workers, threads=threads,
                           memory_limit=memory_limit, tuned=tuned, preprocess=steps)
    typer.echo(result.table())
    if json_path:
        write_json(result, json_path)


@bench_app.command("scale")
def bench_scale_cmd(
    sizes: str = typer.Option("1,4,16", "--sizes", help="Scan sizes in GB of the signal as "
                              "float32, comma-separated (e.g. 1,4,16,100)."),
    kind: str = typer.Option("eels,4dstem", "--kind", help="eels, 4dstem or both (comma-separated)."),
    workdir: Path = typer.Option(Path("bench-scale"), "--dir", help="Where the scans are generated "
                                 "(reused by later runs) and the runs write (removed after each)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures to this file."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="A PNG of seconds per stage and "
                                             "peak memory against size."),
    cluster: Optional[Path] = typer.Option(None, "--cluster", help="A cluster file (default: the "
                                           "LocalCluster emscale run starts)."),
    settings: list[str] = typer.Option([], "--set", help="Override a workflow field, e.g. "
                                       "--set train.epochs=5 (repeatable; values as YAML)."),
    chunk_mib: float = typer.Option(64.0, "--chunk-mib", help="Chunk size of the generated scans "
                                    "(MiB of float32)."),
) -> None:
    """Run the shipped workflow of each kind end to end on synthetic scans of each size and
    print, per stage, seconds, GB/s, the stage's limit measured in the same run (passes over
    the store at the codec's read+decode floor plus its arithmetic at the workers' rates), peak
    worker and client memory, tasks and disk; each size runs in its own process, so that its
    client memory is its own. Checks df first: a 100 GB EELS scan needs about 25 GB of disk.
    Figures to read, not assertions."""
    import yaml

    from emscale.bench.scale import (KINDS, plot, run_scale_bench, scaling_table, table,
                                     write_json)
    from emscale.dask_cluster import load_cluster_file
    from emscale.errors import ConfigError

    kinds = [k.strip() for k in kind.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ConfigError(f"--kind: {bad[0]!r} is not one of {KINDS}")
    try:
        size_list = [float(v) for v in sizes.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sizes: numbers separated by commas, got {sizes!r}") from None
    overrides = {}
    for item in settings:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set: SECTION.FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    if cluster:
        load_cluster_file(cluster)  # its errors before any scan is generated
    # the path, not the loaded file: each run is a spawned process (the schema class is local)
    runs = run_scale_bench(size_list, kinds, workdir, cluster_cfg=cluster, overrides=overrides,
                           chunk_mib=chunk_mib, echo=typer.echo)
    typer.echo(table(runs))
    if scaling_table(runs):
        typer.echo(scaling_table(runs))
    if json_path:
        write_json(runs, json_path)
    if plot_path:
        plot(runs, plot_path)


@bench_app.command("train")
def bench_train_cmd(
    shape: tuple[int, int] = typer.Option((256, 512), "--shape", help="Navigation size of the "
                                          "generated scan (NY NX)."),
    channels: int = typer.Option(1024, "--channels", help="Energy channels (the MLP's input)."),
    epochs: int = typer.Option(3, "--epochs", help="Epochs per measurement (the first is warm-up)."),
    threads: int = typer.Option(2, "--threads", help="PyTorch CPU threads."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures to this file."),
) -> None:
    """Autoencoder training samples/s at batch 256 and 1024: a plain in-memory PyTorch loop
    against emscale's trainer streaming the same pixels from Zarr."""
    from emscale.bench.train import run_train_bench

    result = run_train_bench(shape=shape, channels=channels, epochs=epochs, threads=threads)
    typer.echo(result.table())
    if json_path:
        json_path.write_text(json.dumps(result.to_dict(), indent=2))


@bench_app.command("phases")
def bench_phases_cmd(
    kind: str = typer.Option("eels", "--kind", help="eels (spectra, the MLP, k-means) or 4dstem "
                             "(diffraction patterns, the shipped 4D-STEM workflow's chain: "
                             "central disk masked, log, polar features; MLP; k-means)."),
    shape: tuple[int, int] = typer.Option((512, 512), "--shape", help="Navigation size of the "
                                          "generated scans (NY NX)."),
    channels: int = typer.Option(1024, "--channels", help="Energy channels (eels)."),
    pattern: tuple[int, int] = typer.Option((128, 128), "--pattern", help="Detector pixels "
                                            "(4dstem)."),
    latent: Optional[int] = typer.Option(None, "--latent", help="Autoencoder latent size (and "
                                         "PCA k); default 4 (eels), 8 (4dstem)."),
    epochs: int = typer.Option(20, "--epochs", help="Training epochs (on at most 65536 pixels)."),
    workers: int = typer.Option(2, "--workers", help="LocalCluster worker processes (1 thread each)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the scan, the training and the clustering."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures to this file."),
) -> None:
    """Phase map and anomaly map of a synthetic EELS or 4D-STEM scan with anomalies, through the whole chain
    on a LocalCluster: ARI against the ground truth (autoencoder and PCA), anomaly recall and
    false-alarm rate, encode + score throughput against the read floor."""
    from emscale.bench.phases import run_phase_bench

    result = run_phase_bench(shape=shape, channels=channels, latent_dim=latent, epochs=epochs,
                             workers=workers, seed=seed, kind=kind, pattern=pattern)
    typer.echo(result.table())
    if json_path:
        json_path.write_text(json.dumps(result.to_dict(), indent=2))


@bench_app.command("quality")
def bench_quality_cmd(
    epochs: int = typer.Option(300, "--epochs", help="Training epochs of the lecture's "
                               "experiment (the lecture: 300, cosine schedule)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Minibatch size of the experiment."),
    per_phase: int = typer.Option(100, "--per-phase", help="Spectra per phase group (4 groups)."),
    width: int = typer.Option(20, "--width", help="Pixels per row of the generated scans "
                              "(4 x per-phase must make whole bands of this width)."),
    data: str = typer.Option("emscale", "--data", help="Spectra of the experiment: 'emscale' "
                             "(emscale's iron-oxide generator: edges, plasmon, thickness) or "
                             "'lecture' (the lecture's two Gaussian peaks, 700-740 eV, as it "
                             "describes them)."),
    channels: Optional[int] = typer.Option(None, "--channels", help="Energy channels (default: "
                                           "1024 for emscale's spectra, 200 for the lecture's)."),
    latent: int = typer.Option(4, "--latent", help="The bottleneck k of the main figures."),
    sweep: str = typer.Option("1,2,3,4,5,6,7,8", "--sweep", help="Bottleneck sizes of the sweep, "
                              "comma-separated (empty: no sweep)."),
    seed: int = typer.Option(42, "--seed", help="Seed of the training set (the test set: +1)."),
    repeats: int = typer.Option(3, "--repeats", help="Trainings of the main bottleneck with "
                                "seeds seed, seed+1, ...: the spread that training alone gives."),
    large: bool = typer.Option(True, "--large/--no-large", help="Also run the large variant "
                               "through the distributed pipeline."),
    large_shape: tuple[int, int] = typer.Option((256, 256), "--large-shape", help="Scan size of "
                                                "the large variant (NY NX)."),
    large_epochs: int = typer.Option(20, "--large-epochs", help="Training epochs of the large "
                                     "variant (on at most 65536 pixels of its reference scan)."),
    workers: int = typer.Option(2, "--workers", help="LocalCluster workers of the large variant."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write every figure to "
                                             "this file."),
) -> None:
    """The lecture's denoising-autoencoder experiment (4 x 100 noisy EELS spectra, seed 42,
    bottleneck 4, 300 epochs) with emscale's generator, stages and models: PCA and the
    autoencoder fitted on one training set and measured on a held-out test set (MSE against the
    clean spectra, k-means silhouettes, a left-out phase as anomaly, a bottleneck sweep), printed
    beside the lecture's figures; then a large scan with spatial phases and anomalies through the
    whole pipeline on a LocalCluster, with ARI against the ground truth."""
    from emscale.bench.quality import LectureSettings, run_quality_bench
    from emscale.errors import ConfigError

    try:
        ks = tuple(int(k) for k in sweep.split(",") if k.strip())
    except ValueError:
        raise ConfigError(f"--sweep: comma-separated positive integers, got {sweep!r}") from None
    settings = LectureSettings(per_phase=per_phase, width=width, channels=channels, data=data,
                               latent_dim=latent, epochs=epochs, batch_size=batch_size,
                               seed=seed, sweep=ks, repeats=repeats)
    result = run_quality_bench(settings, large_shape=large_shape if large else None,
                               large_epochs=large_epochs, workers=workers)
    typer.echo(result.table())
    if json_path:
        json_path.write_text(json.dumps(result.to_dict(), indent=2))


GLOBAL_OPTIONS = ("-v", "--verbose", "--debug")


def _global_options_first(args: list[str]) -> list[str]:
    """``-v`` and ``--debug`` are accepted after the command too (``emscale run wf.yaml -v``):
    click takes a group's options only before the command, so they are moved there. No command
    has options of these names; after ``--`` nothing is moved."""
    end = args.index("--") if "--" in args else len(args)
    moved = [a for a in args[:end] if a in GLOBAL_OPTIONS]
    return moved + [a for a in args[:end] if a not in GLOBAL_OPTIONS] + args[end:]


def main(argv: list[str] | None = None) -> int:
    args = _global_options_first(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="emscale", standalone_mode=False)
        if code == 130:  # typer's answer to Ctrl-C: it caught the KeyboardInterrupt
            typer.echo("emscale: interrupted", err=True)
        # click returns the code of a typer.Exit raised by a command (batch: 1 on a failed scan)
        return code if isinstance(code, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:  # usage errors (click's): their own message, exit 2
        exc.show()
        return getattr(exc, "exit_code", 2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("emscale: interrupted", err=True)
        return 130
    except EmscaleError as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"emscale: error: {exc}", err=True)
        return 1
    except Exception as exc:  # a bug or an unexpected library error: still one line by default
        if debug:
            traceback.print_exc()
        typer.echo(f"emscale: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                   err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
