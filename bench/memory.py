"""Benchmark 3, memory: peak RSS above the post-import level while collecting one 25 MB message.

The collection runs in a fresh process (``python -m bench.memory probe``) so that nothing from the other
benchmarks is in the heap: it imports the app's modules, builds its services, resets the kernel's high-water
mark (``/proc/self/clear_refs``), collects the mailbox and reports ``VmHWM`` minus the RSS before collecting.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import MB, ROOT, Row, Workspace, make_message, say

GOAL = 2.0  # times the message size


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(address: str) -> dict[str, Any]:
    """Run inside the fresh process: the settings come from the environment, as in the Functions host."""
    from collectors.services import build_services
    from shared.settings import load_settings

    services = build_services(load_settings())
    mailbox = services.registry.get(address)
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
    result = services.collector.collect_mailbox(mailbox, deadline=time.monotonic() + 600)
    peak = _status_kb("VmHWM")
    return {"outcome": result.outcome, "bytes": result.bytes, "rss_before_kb": before, "peak_kb": peak}


def run(info: dict[str, Any], *, size: int = 25 * MB) -> list[Row]:
    ws = Workspace(info, "memory")
    try:
        address = ws.address("memory")
        ws.consent([address])
        ws.deliver(address, [make_message(size, serial=1, rng=random.Random(3))])
        env = {**os.environ, **ws.env, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, "-m", "bench.memory", address],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"memory probe failed: {done.stderr[-2000:]}")
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        if figures["outcome"] != "ok":
            raise RuntimeError(f"memory probe could not collect: {figures}")
        above = (figures["peak_kb"] - figures["rss_before_kb"]) * 1024
        ratio = above / figures["bytes"]
        say(f"memory: peak {above / MB:.1f} MB above the post-import RSS for a {figures['bytes'] / MB:.1f} MB message")
        return [
            Row(
                "3 memory, one 25 MB message",
                f"+{above / MB:.1f} MB peak RSS",
                f"message {figures['bytes'] / MB:.1f} MB",
                ratio,
                f"<= {GOAL:.0f}x the message",
                ratio <= GOAL,
                f"fresh process; post-import RSS {figures['rss_before_kb'] / 1024:.0f} MB (modules and services)",
            )
        ]
    finally:
        ws.close()


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1])))
