#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, then run the demo workflow (ends by
# printing where the report is).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
# the demo workflow on a LocalCluster: a generated scan, phase map, anomaly map, report
"$VENV/bin/emscale" run workflows/demo.yaml --output demo/run
