#!/usr/bin/env bash
# Set up .venv (first time only) and train on the bundled ethanol data:
#   bash examples/run.sh                    # run directory: outputs/YYYY-MM-DD/HH-MM-SS
#   bash examples/run.sh -o runs/ethanol    # extra arguments go to `hpctrain train`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup-venv.sh
exec "${HPCTRAIN_VENV:-.venv}/bin/hpctrain" train examples/options.yaml "$@"
