#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment. Idempotent: a second run is quick.
# VENV picks its place (default .venv in the repository). constraints-cpu.txt pins the local
# CPU build of torch so that no CUDA packages are downloaded on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.emscale-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints-cpu.txt -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -c constraints-cpu.txt -e ".[dev]"
    touch "$stamp"
fi
