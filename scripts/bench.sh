#!/usr/bin/env bash
# Runs every benchmark (bench/README.md) against the local stack and prints one table of same-run ratios.
# The stack is started when it is not running and left running. Extra arguments go to `python -m bench`,
# e.g. scripts/bench.sh --only latency,memory --scale 0.5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m devstack start
.venv/bin/python -m bench "$@"
