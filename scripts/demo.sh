#!/usr/bin/env bash
# The main job against the local stack: start it and the local Functions host, authorize a demo mailbox in headless
# Chromium, deliver sample mail to it, run the collector, and print the envelopes that reached the queue.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m devstack start
.venv/bin/python scripts/demo.py "$@"
