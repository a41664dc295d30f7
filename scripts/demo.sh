#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, generate a demo scan, describe it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
mkdir -p demo
rm -rf demo/eels-demo.zarr
"$VENV/bin/emscale" synth eels demo/eels-demo.zarr --shape 128 128 --anomaly --seed 42 --chunk-mib 16
"$VENV/bin/emscale" info demo/eels-demo.zarr
