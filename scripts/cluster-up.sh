#!/usr/bin/env bash
# Start a cluster of several hosts simulated on this machine (network, UTS and mount namespaces
# joined by a bridge: scripts/simcluster.py says how), or stop it with --down. Needs root.
#   bash scripts/cluster-up.sh [--nodes 2] [--state DIR]      prints the cluster file
#   bash scripts/cluster-up.sh --down [--state DIR]           leaves nothing running
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v ip >/dev/null || ! command -v nsenter >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        iproute2 util-linux >/dev/null
fi
PY=${VENV:-.venv}/bin/python
[[ -x "$PY" ]] || bash scripts/setup.sh
if [[ "${1:-}" == "--down" ]]; then
    exec "$PY" scripts/simcluster.py down "${@:2}"
fi
exec "$PY" scripts/simcluster.py up "$@"
