"""``emscale submit``: a batch script that runs ``emscale run`` as one job, submitted to Slurm or
PBS (for overnight runs: ``--begin``). The job is the driver (scheduler and client); its workers
are what the cluster file says (a LocalCluster inside the job, or further batch jobs). The script
is kept in the output directory beside the job's log."""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import sys
from pathlib import Path

from emscale.errors import ConfigError

log = logging.getLogger(__name__)


def batch_script(workflow: Path, cluster_file: Path, cfg, output: Path,
                 begin: str | None = None) -> tuple[str, str]:
    """(the script, the submit command) for the cluster file's system (slurm or pbs; a local
    cluster file runs inside a Slurm job)."""
    workflow, cluster_file, output = (Path(p).resolve() for p in (workflow, cluster_file, output))
    for what, value in (("workflow", workflow), ("--cluster", cluster_file), ("output", output),
                        ("current directory", Path.cwd())):
        _check_printable(what, str(value))
    if begin is not None and not BEGIN.fullmatch(begin):
        raise ConfigError(f"--begin: {begin!r} is not a time (e.g. 22:00, now+1hour, "
                          "2026-12-24T20:00, 12/24/26; letters, digits and : + - . / only)")
    if '"' in str(output) or "\\" in str(output):
        raise ConfigError(f"output: {output}: a double quote or backslash cannot be passed in a "
                          "batch script's directive; choose another path")
    local = cfg.type == "local"
    runner = cfg.type == "slurm-runner"
    cores = cfg.workers * cfg.threads if local else cfg.threads if runner else 1
    memory = _memory_mb(cfg.memory) * (cfg.workers if local else 1)
    name = re.sub(r"[^\w.\-]", "_", f"emscale-{workflow.stem}")[:60]
    command = " ".join(shlex.quote(a) for a in (
        *(("srun",) if runner else ()), sys.executable, "-m", "emscale", "run", str(workflow),
        "--cluster", str(cluster_file), "--output", str(output)))
    if cfg.type == "pbs":
        lines = [f"#PBS -N {name}", f"#PBS -l select=1:ncpus={cores}:mem={memory}mb",
                 f"#PBS -l walltime={cfg.walltime}",
                 f'#PBS -o "{output}/submit.out"', "#PBS -j oe"]
        lines += [f"#PBS -q {cfg.queue}"] if cfg.queue else []
        lines += [f"#PBS -A {cfg.account}"] if cfg.account else []
        lines += [f"#PBS -a {begin}"] if begin else []
        lines += [f"#PBS {d}" for d in cfg.job_extra_directives]
        submit = "qsub"
    elif cfg.type in ("slurm", "local", "slurm-runner"):
        # slurm-runner: one task per role (scheduler, emscale, workers), memory per task
        tasks = [f"#SBATCH -n {cfg.workers + 2}", f"#SBATCH --mem-per-cpu={memory // cores}M"] \
            if runner else [f"#SBATCH --mem={memory}M"]
        lines = [f"#SBATCH -J {name}", f"#SBATCH -c {cores}", *tasks,
                 f"#SBATCH -t {cfg.walltime}",
                 # quoted: a space; %% : a % of the path is not one of Slurm's patterns
                 f'#SBATCH -o "{str(output).replace("%", "%%")}/submit-%j.out"']
        lines += [f"#SBATCH -p {cfg.queue}"] if cfg.queue else []
        lines += [f"#SBATCH -A {cfg.account}"] if cfg.account else []
        lines += [f"#SBATCH --begin={begin}"] if begin else []
        lines += [f"#SBATCH --gres=gpu:{cfg.gpus}"] if cfg.gpus and cfg.type != "slurm" else []
        lines += [f"#SBATCH {d}" for d in cfg.job_extra_directives]
        submit = "sbatch"
    else:
        raise ConfigError("submit: the cluster file must be of type slurm, pbs, slurm-runner "
                          "or local (run inside a Slurm job), not an existing scheduler's address")
    script = "\n".join(["#!/usr/bin/env bash", *lines, "set -euo pipefail",
                        f"cd {shlex.quote(str(Path.cwd()))}", f"exec {command}", ""])
    return script, submit


# Slurm's --begin and PBS's -a: a time, a date, or now+N<unit>
BEGIN = re.compile(r"[A-Za-z0-9:+\-./]+")


def _check_printable(what: str, value: str) -> None:
    """Refuse control characters (a line break would end a directive and start a command)."""
    bad = [c for c in value if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise ConfigError(f"{what}: {value!r} holds a control character ({bad[0]!r}); rename it")


def _memory_mb(text: str) -> int:
    from dask.utils import parse_bytes

    try:
        return max(1, parse_bytes(str(text)) >> 20)
    except ValueError:
        raise ConfigError(f"memory: cannot read {text!r} (e.g. 4GiB, 2000MB)") from None


def submit(workflow: Path, cluster_file: Path, cfg, output: Path, begin: str | None = None) -> str:
    """Write ``OUTPUT/submit.sh``, submit it, and return the job id."""
    script, command = batch_script(workflow, cluster_file, cfg, output, begin)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / "submit.sh"
    path.write_text(script)
    path.chmod(0o755)
    try:
        done = subprocess.run([command, str(path)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ConfigError(f"submit: {command} not found: is this a {cfg.type} login node?") from None
    if done.returncode != 0:
        raise ConfigError(f"submit: {command} refused {path}: {done.stderr.strip()[-500:]}")
    found = re.search(r"(\d+[\w.\-]*)\s*$", done.stdout.strip())
    job = found.group(1) if found else done.stdout.strip()
    log.info("submitted %s as job %s", path, job)
    return job
