#!/usr/bin/env bash
# Set up .venv (first time only) and run the whole test suite:
#   bash tests/run.sh                 # everything, as CI does
#   bash tests/run.sh -m "not slow"   # the fast unit tests only (seconds)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup-venv.sh
exec "${HPCTRAIN_VENV:-.venv}/bin/python" -m pytest "$@"
