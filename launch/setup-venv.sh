#!/usr/bin/env bash
# Create (or update) the virtual environment of this checkout and install hpctrain
# into it, with its test and docs tools. Idempotent: a second run only checks.
#
#   bash launch/setup-venv.sh            # -> .venv/
#   HPCTRAIN_VENV=/path/to/env bash launch/setup-venv.sh
#
# torch is installed first and pinned while the rest is installed, so that no
# dependency can swap it for another build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${HPCTRAIN_VENV:-.venv}
TORCH=${HPCTRAIN_TORCH:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV"; then
    echo "error: python3 -m venv failed; on Debian/Ubuntu install it with: apt-get install python3-venv" >&2
    exit 1
  fi
fi
stamp="$VENV/.hpctrain-installed"
want="torch==$TORCH $(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (torch $TORCH, hpctrain and its dependencies)..."
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==$TORCH"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH" > "$constraints"
"$VENV/bin/python" -m pip install -q -c "$constraints" -e ".[dev]"
echo "$want" > "$stamp"
echo "$VENV is ready"
