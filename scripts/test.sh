#!/usr/bin/env bash
# Lint, types, the infrastructure scan and every test (unit, integration, browser, faults) against the local
# stack, which is started when it is not running and left running for the next run (python -m devstack stop).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not integration".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== lint and types"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
if [ -f scripts/check-infra.sh ]; then
  echo "== infrastructure scan"
  bash scripts/check-infra.sh
fi
echo "== local stack"
.venv/bin/python -m devstack start
echo "== tests"
# The whole run logs at DEBUG and is scanned for tokens, codes and secrets at the end (tests/support/secret_scan.py).
SECRET_SCAN="${SECRET_SCAN:-1}" .venv/bin/python -m pytest "$@"
