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
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # emscale, run from a checkout

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


def on(host: str, argv: list[str], state: Path = STATE, **popen) -> subprocess.Popen:
    """Start ``argv`` on ``host`` (its network, host name and mounts), in this directory."""
    pid = _holder(state, host)
    return subprocess.Popen(["nsenter", "-t", str(pid), "-n", "-u", "-m", f"--wd={os.getcwd()}",
                             "--", *argv], **popen)


def run_on(host: str, argv: list[str], state: Path = STATE, timeout: float = 600,
           **kwargs) -> subprocess.CompletedProcess:
    pid = _holder(state, host)
    return subprocess.run(["nsenter", "-t", str(pid), "-n", "-u", "-m", f"--wd={os.getcwd()}",
                           "--", *argv], timeout=timeout, **kwargs)


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
    script = (f"hostname {host} && mount -t tmpfs -o size=2g,mode=1777 tmpfs /tmp && "
              f"mount --bind {state / 'hosts'} /etc/hosts && echo $$ > {pidfile} && "
              "exec sleep infinity")
    subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--uts", "--mount", "--propagation",
                      "private", "--fork", "sh", "-c", script], start_new_session=True,
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
    parser.add_argument("--state", type=Path, default=STATE)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.action == "up":
        print(up(args.nodes, args.state, tls=not args.no_tls))
        print(f"emscale on the login host: python scripts/simcluster.py on login -- emscale run "
              f"WORKFLOW --cluster {args.state / 'cluster.yaml'} (data under "
              f"{args.state / 'shared'}: /tmp is each host's own)")
    elif args.action == "down":
        down(args.state)
    elif args.action == "on":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        return run_on(args.host, command, args.state, timeout=None).returncode
    elif args.action == "kill":
        print(" ".join(map(str, kill(args.host, args.state))))
    else:
        start(args.host, args.state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
