#!/usr/bin/env bash
# The test suite on a fresh machine: set up the environment, run pytest (extra args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest "$@"
