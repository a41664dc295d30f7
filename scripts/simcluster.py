"""A cluster of several hosts simulated on one machine, for the multi-host tests and for trying
emscale as on a facility cluster (issue 18). Needs root (network, UTS and mount namespaces).

Each host is a Linux network namespace with a UTS namespace of its own (its host name) and a
private /tmp, joined to the others by a bridge that lives in a namespace of its own (the
machine's own network is not touched; no traffic leaves these namespaces): ``login``
(10.77.0.1) runs the Dask scheduler and emscale, ``node1``, ``node2``, ... (10.77.0.11, ...)
run one Dask worker each. Every host sees the machine's file system at the same paths (the
project, its virtual environment, the shared data directory), as a facility's nodes see a
shared file system; /tmp is each host's own, as on real nodes. There is no NFS: this kernel has
no NFS client (``nfs`` is not in /proc/filesystems and there are no modules to load), so the
shared storage is the machine's own file system seen from every host.

    python scripts/simcluster.py up [--nodes 2] [--state DIR]   start it (prints the cluster file)
    python scripts/simcluster.py down [--state DIR]             stop it, leave nothing running
    python scripts/simcluster.py on HOST [--state DIR] -- CMD   run CMD on HOST
    python scripts/simcluster.py kill HOST [--state DIR]        take HOST down (all its processes)
    python scripts/simcluster.py start HOST [--state DIR]       bring HOST back with its worker
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout (and, from it, emscale)
sys.path.insert(0, str(ROOT))

STATE = Path("/var/tmp/emscale-cluster")  # not /tmp: every host has its own /tmp
SUBNET = "10.77.0"
PREFIX = "emscale-"  # of the namespaces' names (tests use their own)
SCHEDULER_PORT = 8786


def address(host: str) -> str:
    return f"{SUBNET}.1" if host == "login" else f"{SUBNET}.{10 + int(host.removeprefix('node'))}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _state(state: Path) -> dict:
    path = state / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save(state: Path, data: dict) -> None:
    (state / "state.json").write_text(json.dumps(data, indent=1))


def _holder(state: Path, host: str) -> int:
    return int((state / f"{host}.pid").read_text())


def _enter(state: Path, host: str, cwd=None) -> list[str]:
    return ["nsenter", "-t", str(_holder(state, host)), "-n", "-u", "-m",
            f"--wd={cwd or os.getcwd()}", "--"]


def on(host: str, argv: list[str], state: Path = STATE, cwd=None, **popen) -> subprocess.Popen:
    """Start ``argv`` on ``host`` (its network, host name and mounts), in ``cwd`` (default:
    this directory)."""
    return subprocess.Popen([*_enter(state, host, cwd), *argv], **popen)


def run_on(host: str, argv: list[str], state: Path = STATE, timeout: float = 600, cwd=None,
           **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*_enter(state, host, cwd), *argv], timeout=timeout, **kwargs)


def _add_host(state: Path, host: str) -> None:
    """The host's namespace, its link to the bridge and the process that holds its host name
    and mounts (``sleep``, its pid in ``HOST.pid``)."""
    prefix = _state(state)["prefix"]
    ns = prefix + host
    if not Path(f"/run/netns/{ns}").exists():
        _ip("netns", "add", ns)
        _ip("-n", prefix + "net", "link", "add", f"v-{host}", "type", "veth", "peer", "name",
            "eth0", "netns", ns)
        _ip("-n", prefix + "net", "link", "set", f"v-{host}", "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address(host)}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
    pidfile = state / f"{host}.pid"
    pidfile.unlink(missing_ok=True)
    # /tmp is the host's own, but what runs there must be found where the client has it: a
    # checkout or virtual environment under /tmp (a CI clone) is bound back into the new /tmp
    # (the CI run of the tests failed with exit 127 before: no python at that path on a host)
    keep = sorted({p for p in (ROOT, Path(sys.prefix).resolve(), Path(os.getcwd()).resolve())
                   if p.is_relative_to("/tmp")})
    keep = [p for p in keep if not any(p != q and p.is_relative_to(q) for q in keep)]
    hold = [state / "keep" / str(i) for i in range(len(keep))]
    for h in hold:
        h.mkdir(parents=True, exist_ok=True)
    save = "".join(f"mount --bind {shlex.quote(str(p))} {h} && " for p, h in zip(keep, hold))
    back = "".join(f"mkdir -p {shlex.quote(str(p))} && mount --bind {h} {shlex.quote(str(p))} "
                   "&& " for p, h in zip(keep, hold))
    script = (f"hostname {host} && {save}mount -t tmpfs -o size=2g,mode=1777 tmpfs /tmp && "
              f"{back}mount --bind {state / 'hosts'} /etc/hosts && echo $$ > {pidfile} && "
              "exec sleep infinity")
    # nsenter, not ip netns exec: that mounts a sysfs of its own, without the machine's cgroup
    # hierarchies, and slurmd does not start without them
    subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount",
                      "--propagation", "private", "--fork", "sh", "-c", script],
                     start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=open(state / f"{host}.log", "ab"))
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"host {host} did not start: see {state / f'{host}.log'}")


def _daemon(state: Path, host: str, name: str, argv: list[str], env: dict) -> int:
    log = open(state / f"{name}.log", "ab")
    proc = on(host, argv, state, env=env, stdin=subprocess.DEVNULL, stdout=log,
              stderr=subprocess.STDOUT, start_new_session=True)
    data = _state(state)
    data.setdefault("daemons", {})[name] = proc.pid
    _save(state, data)
    return proc.pid


def scheduler_address(state: Path) -> str:
    protocol = "tls" if _state(state).get("tls") else "tcp"
    return f"{protocol}://{address('login')}:{SCHEDULER_PORT}"


def _tls_options(state: Path) -> list[str]:
    from emscale.tls import worker_options

    return worker_options(state / "tls") if _state(state).get("tls") else []


def _worker(state: Path, host: str, python: str, resources: str | None = None) -> None:
    """The host's Dask worker; ``resources`` as ``dask worker --resources`` takes them (e.g.
    ``GPU=1``: a GPU node, as far as placement goes)."""
    from emscale.dask_cluster import worker_environment

    env = {**os.environ, **worker_environment()}
    _daemon(state, host, f"{host}-worker",
            [python, "-m", "dask", "worker", scheduler_address(state), "--host", address(host),
             "--name", host, "--nthreads", "1", "--nworkers", "1", "--memory-limit", "3GiB",
             "--local-directory", "/tmp/dask-worker-space", "--no-dashboard",
             *(["--resources", resources] if resources else []), *_tls_options(state)], env)


def wait_for_workers(state: Path, n: int, python: str, timeout: float = 120) -> None:
    tls = f"security=security({str(state / 'tls')!r}), " if _state(state).get("tls") else ""
    code = ("from distributed import Client\n"
            "from emscale.tls import security\n"
            f"c = Client({scheduler_address(state)!r}, {tls}timeout={timeout})\n"
            f"c.wait_for_workers({n}, timeout={timeout})\n"
            "c.close()\n")
    run_on("login", [python, "-c", code], state, check=True, capture_output=True,
           timeout=timeout + 30)


def up(nodes: int = 2, state: Path = STATE, python: str = sys.executable,
       prefix: str = PREFIX, tls: bool = True) -> Path:
    """Start the hosts, the scheduler on login and a worker on each node; returns the cluster
    file (``type: address``) that emscale on login takes. ``prefix`` names the namespaces;
    ``tls``: every connection encrypted, with certificates made for this cluster."""
    if Path(f"/run/netns/{prefix}net").exists():
        raise SystemExit(f"a simulated cluster is up already ({prefix}* namespaces): stop it "
                         "first (down)")
    state.mkdir(parents=True, exist_ok=True)
    hosts = ["login", *(f"node{i}" for i in range(1, nodes + 1))]
    (state / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
        f"{address(h)} {h}\n" for h in hosts))
    _save(state, {"hosts": hosts, "python": python, "daemons": {}, "prefix": prefix,
                  "tls": tls})
    if tls:
        from emscale.tls import make_certificates

        make_certificates(state / "tls")
    _ip("netns", "add", prefix + "net")
    _ip("-n", prefix + "net", "link", "add", "br0", "type", "bridge")
    _ip("-n", prefix + "net", "link", "set", "br0", "up")
    for host in hosts:
        _add_host(state, host)
    _daemon(state, "login", "scheduler",
            [python, "-m", "dask", "scheduler", "--host", address("login"), "--port",
             str(SCHEDULER_PORT), "--dashboard-address", f"{address('login')}:8787",
             *(["--protocol", "tls"] if tls else []), *_tls_options(state)], dict(os.environ))
    for host in hosts[1:]:
        _worker(state, host, python)
    wait_for_workers(state, nodes, python)
    cluster = state / "cluster.yaml"
    cluster.write_text(f"type: address\naddress: {scheduler_address(state)}\n"
                       f"wait_for_workers: {nodes}\ntimeout: 60\n"
                       + (f"tls: {state / 'tls'}\n" if tls else ""))
    return cluster


SLURM_CONF = """ClusterName=emscale-sim
SlurmctldHost=login({login})
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
KillWait=5
StateSaveLocation={slurm}/ctld
SlurmdSpoolDir={slurm}/d-%n
SlurmctldPidFile={slurm}/ctld.pid
SlurmdPidFile={slurm}/d-%n.pid
SlurmctldLogFile={slurm}/ctld.log
SlurmdLogFile={slurm}/d-%n.log
{nodes}
PartitionName=sim Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def slurm_env(state: Path) -> dict:
    """The environment in which ``sbatch``, ``squeue`` (and emscale) talk to the simulated
    cluster's Slurm."""
    return {**os.environ, "SLURM_CONF": str(state / "slurm" / "slurm.conf")}


def _munge() -> None:
    """munged, as slurm-up.sh starts it (its socket is a file: every host reaches it)."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    for d in ("/run/munge", "/etc/munge"):
        os.makedirs(d, exist_ok=True)
        subprocess.run(["chown", "munge:munge", d], check=True)
    key = Path("/etc/munge/munge.key")
    if not key.exists() or key.stat().st_size == 0:
        key.write_bytes(os.urandom(1024))
        subprocess.run(["chown", "munge:munge", str(key)], check=True)
        key.chmod(0o400)
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)


def slurm_up(state: Path = STATE, timeout: float = 60) -> Path:
    """A Slurm across the hosts: slurmctld on login, a slurmd on each node (its own spool,
    pid and log files); returns a cluster file whose workers are Slurm jobs on the nodes."""
    data = _state(state)
    nodes = [h for h in data["hosts"] if h != "login"]
    slurm = state / "slurm"
    (slurm / "ctld").mkdir(parents=True, exist_ok=True)
    (state / "shared" / "jobs").mkdir(parents=True, exist_ok=True)
    (slurm / "slurm.conf").write_text(SLURM_CONF.format(
        login=address("login"), slurm=slurm, nodes="\n".join(
            f"NodeName={n} NodeAddr={address(n)} CPUs=2 RealMemory=8000 State=UNKNOWN"
            for n in nodes)))
    _munge()
    env = slurm_env(state)
    _daemon(state, "login", "slurmctld", ["slurmctld", "-D", "-c"], env)
    for node in nodes:
        (slurm / f"d-{node}").mkdir(exist_ok=True)
        _daemon(state, node, f"{node}-slurmd", ["slurmd", "-D", "-N", node], env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = run_on("login", ["sinfo", "-h", "-N", "-o", "%N %t"], state, env=env,
                        capture_output=True, text=True).stdout.split()
        ready = dict(zip(states[::2], states[1::2]))
        if len(ready) == len(nodes) and all(v in ("idle", "mix", "alloc")
                                            for v in ready.values()):
            break
        for node, st in ready.items():
            if st.startswith(("drain", "down")):
                run_on("login", ["scontrol", "update", f"nodename={node}", "state=resume"],
                       state, env=env, capture_output=True)
        time.sleep(0.3)
    else:
        raise RuntimeError(f"the simulated Slurm's nodes did not come up: see {slurm}")
    cluster = state / "slurm-cluster.yaml"
    tls = f"tls: {state / 'tls'}\n" if data.get("tls") else ""
    cluster.write_text(f"type: slurm\njobs: {len(nodes)}\ncores: 1\nmemory: 2GiB\n"
                       f"walltime: '00:20:00'\ninterface: eth0\nwait_for_workers: {len(nodes)}\n"
                       f"timeout: 120\nlog_directory: {state / 'shared' / 'jobs'}\n"
                       f"dashboard_address: null\n{tls}")
    return cluster


def _processes_of(state: Path, host: str) -> list[int]:
    """Every process in the host's UTS namespace (its holder included)."""
    try:
        ns = os.readlink(f"/proc/{_holder(state, host)}/ns/uts")
    except (FileNotFoundError, ValueError):
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/uts") == ns:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def kill(host: str, state: Path = STATE) -> list[int]:
    """Take a host down: SIGKILL every process on it (as a node that loses power)."""
    pids = _processes_of(state, host)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def start(host: str, state: Path = STATE, resources: str | None = None) -> None:
    """Bring a host taken down back, with its worker (declaring ``resources``)."""
    data = _state(state)
    _add_host(state, host)
    if host != "login":
        _worker(state, host, data["python"], resources)


def down(state: Path = STATE) -> None:
    """Stop everything the cluster started and remove its namespaces."""
    data = _state(state)
    if "slurmctld" in data.get("daemons", {}) and "login" in data.get("hosts", []):
        try:  # the jobs first (their workers), while slurmctld can still cancel them
            run_on("login", ["scancel", "--partition=sim"], state, env=slurm_env(state),
                   capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    for host in data.get("hosts", []):
        kill(host, state)
    prefix = data.get("prefix", PREFIX)
    for name in os.listdir("/run/netns") if Path("/run/netns").exists() else []:
        if name.startswith(prefix) and name.removeprefix(prefix) in ("net", *data.get("hosts", [])):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    for pid in data.get("daemons", {}).values():  # (dead with their hosts; a last check)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for name in data.get("hosts", []):
        (state / f"{name}.pid").unlink(missing_ok=True)
    if (state / "state.json").exists():
        (state / "state.json").unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "on", "kill", "start"])
    parser.add_argument("host", nargs="?")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--no-tls", action="store_true", help="plain TCP between the hosts")
    parser.add_argument("--slurm", action="store_true", help="also a Slurm across the hosts")
    parser.add_argument("--state", type=Path, default=STATE)
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.action == "up":
        print(up(args.nodes, args.state, tls=not args.no_tls))
        if args.slurm:
            print(slurm_up(args.state))
        py = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) \
            else sys.executable
        print(f"emscale on the login host: {py} scripts/simcluster.py on login -- {py} -m "
              f"emscale run WORKFLOW --cluster {args.state / 'cluster.yaml'} (data under "
              f"{args.state / 'shared'}: /tmp is each host's own)")
    elif args.action == "down":
        down(args.state)
    elif args.action == "on":
        return run_on(args.host, command, args.state, timeout=None).returncode
    elif args.action == "kill":
        print(" ".join(map(str, kill(args.host, args.state))))
    else:
        start(args.host, args.state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
