#!/usr/bin/env bash
# Install (Debian packages) and start a single-node Slurm on this machine, for the real-Slurm
# tests and for trying `emscale run --cluster cluster_configs/slurm.yaml` locally. Needs root
# and apt. Facts behind the settings: DESIGN.md section 6. Idempotent; `--down` stops it;
# `--install` only installs the packages.
set -euo pipefail
stop() {
    if pgrep -x slurmctld >/dev/null; then  # (scancel and squeue retry for ~20 s without it)
        scancel --user="$(id -un)" 2>/dev/null || true   # jobs first: their dask workers must go
        for _ in $(seq 50); do
            [[ -z "$(squeue -h 2>/dev/null)" ]] && break
            sleep 0.2
        done
    fi
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 50); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
        sleep 0.2
    done
    for name in slurmd slurmctld slurmstepd slurmscriptd; do
        pkill -9 -x "$name" 2>/dev/null || true
    done
}
if [[ "${1:-}" == "--down" ]]; then
    stop
    exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
fi
if [[ "${1:-}" == "--install" ]]; then  # the packages only (the simulated hosts' Slurm)
    exit 0
fi
mkdir -p /run/munge /etc/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm
chown munge:munge /run/munge /etc/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
pgrep -x munged >/dev/null || runuser -u munge -- munged
host=$(hostname)
node=$(slurmd -C | head -1 | sed 's/ UpTime=.*//')
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=emscale
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
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
UnkillableStepTimeout=30
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
${node} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
# a clean start every time: no jobs or node states left from an earlier run (slurmctld -c)
stop
slurmctld -c
slurmd
name=$(echo "$node" | sed 's/^NodeName=\([^ ]*\).*/\1/')
for _ in $(seq 75); do
    state=$(sinfo -h -o %t 2>/dev/null | head -1)
    case "$state" in
        idle|mix|alloc) exit 0 ;;
        drain*|down*) scontrol update nodename="$name" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
done
echo "slurm-up: the node did not come up; see /var/log/slurm/" >&2
exit 1
