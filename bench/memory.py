"""Benchmark 3, memory: peak RSS above the post-import level while collecting one 25 MB message, then one 150 MB
message (P3), and 3b: eight mailboxes each with one 100 MB message collected at once under a 2,048 MB memory
limit (P3b).

Each collection runs in a fresh process (``python -m bench.memory probe``) so that nothing from the other
benchmarks is in the heap: it imports the app's modules, builds its services, resets the kernel's high-water
mark (``/proc/self/clear_refs``), collects the mailboxes (all at once, as a run does) and reports ``VmHWM`` minus
the RSS before collecting.

The limit of 3b is the kernel's: a memory cgroup (v2 ``memory.max`` where the v2 hierarchy has the memory
controller, else v1 ``memory.limit_in_bytes``) that the probe process joins before it starts, so the process is
killed if it ever needs more. Without a writable cgroup the probe runs under ``RLIMIT_AS`` instead, with malloc
held to two arenas (each thread's own 64 MB arena would count as address space, used or not).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import MB, ROOT, Row, Workspace, make_message, say

GOAL = 2.0  # times the message size, for 25 MB (benchmark 3 before large messages were streamed)
GOAL_150 = 64 * MB  # peak RSS above the post-import level for one 150 MB message
LIMIT = 2048 * MB  # 3b: a Flex Consumption instance's default memory
CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(addresses: list[str]) -> dict[str, Any]:
    """Run inside the fresh process: the settings come from the environment, as in the Functions host."""
    from collectors.services import build_services
    from shared.settings import load_settings

    services = build_services(load_settings())
    mailboxes = [services.registry.get(address) for address in addresses]
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
    results = services.collector.run(mailboxes, budget_seconds=3000)
    peak = _status_kb("VmHWM")
    return {
        "outcomes": [r.outcome for r in results],
        "bytes": sum(r.bytes for r in results),
        "rss_before_kb": before,
        "peak_kb": peak,
    }


# -- the memory limit of 3b ---------------------------------------------------------------------------------------


class Limit:
    """Where the probe's memory limit comes from, and what it saw."""

    kind = "none"

    def enter_child(self) -> None:
        """Runs in the probe process between fork and exec."""

    def report(self) -> str:
        return ""

    def close(self) -> None:
        pass


class CgroupLimit(Limit):
    def __init__(self, limit: int) -> None:
        v2 = "memory" in (CGROUP_V2 / "cgroup.controllers").read_text().split() if (
            CGROUP_V2 / "cgroup.controllers").exists() else False  # fmt: skip
        name = f"bench-memory-{os.getpid()}"
        if v2:
            self.path, self.kind = CGROUP_V2 / name, "cgroup v2 memory.max"
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0")
        else:
            self.path, self.kind = CGROUP_V1 / name, "cgroup v1 memory.limit_in_bytes"
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit))
        self.v2 = v2

    def enter_child(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def report(self) -> str:
        if self.v2:
            peak = self.path / "memory.peak"
            events = (self.path / "memory.events").read_text().split()
            kills = int(events[events.index("oom_kill") + 1]) if "oom_kill" in events else 0
            figure = f"cgroup peak {int(peak.read_text()) / MB:.0f} MB" if peak.exists() else "cgroup peak not kept"
        else:
            figure = f"cgroup peak {int((self.path / 'memory.max_usage_in_bytes').read_text()) / MB:.0f} MB"
            control = (self.path / "memory.oom_control").read_text().split()
            kills = int(control[control.index("oom_kill") + 1]) if "oom_kill" in control else 0
        return f"{figure} (page cache included), OOM kills {kills}"

    def close(self) -> None:
        for _ in range(50):  # the kernel frees the group once its last process is reaped
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


class AddressSpaceLimit(Limit):
    kind = "RLIMIT_AS"

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def enter_child(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (self.limit, self.limit))


def _limit(limit: int) -> Limit:
    try:
        return CgroupLimit(limit)
    except OSError as e:
        say(f"memory: no writable memory cgroup ({type(e).__name__}); RLIMIT_AS instead")
        return AddressSpaceLimit(limit)


# -- the runs -----------------------------------------------------------------------------------------------------


def _run_probe(ws: Workspace, addresses: list[str], limit: Limit | None = None) -> tuple[dict[str, Any], int]:
    env = {**os.environ, **ws.env, "PYTHONPATH": str(ROOT)}
    if isinstance(limit, AddressSpaceLimit):
        env["MALLOC_ARENA_MAX"] = "2"
    child: Callable[[], None] | None = limit.enter_child if limit is not None else None
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", *addresses],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        preexec_fn=child,  # joins the memory limit before the interpreter starts
    )
    if done.returncode != 0:
        return {"stderr": done.stderr[-2000:]}, done.returncode
    return json.loads(done.stdout.strip().splitlines()[-1]), 0


def _one_message(info: dict[str, Any], size: int, *, goal: int, goal_text: str, seed: int) -> Row:
    """One mailbox with one message of ``size`` bytes; met when the peak above the post-import RSS is <= goal."""
    ws = Workspace(info, "memory")
    try:
        address = ws.address("memory")
        ws.consent([address])
        ws.deliver(address, [make_message(size, serial=1, rng=random.Random(seed))])
        figures, code = _run_probe(ws, [address])
        if code or figures["outcomes"] != ["ok"]:
            raise RuntimeError(f"memory probe could not collect: {code} {figures}")
        above = (figures["peak_kb"] - figures["rss_before_kb"]) * 1024
        ratio = above / figures["bytes"]
        say(f"memory: peak {above / MB:.1f} MB above the post-import RSS for a {figures['bytes'] / MB:.1f} MB message")
        return Row(
            f"3 memory, one {size // MB} MB message",
            f"+{above / MB:.1f} MB peak RSS",
            f"message {figures['bytes'] / MB:.1f} MB",
            ratio,
            goal_text,
            above <= goal,
            f"fresh process; post-import RSS {figures['rss_before_kb'] / 1024:.0f} MB (modules and services)",
        )
    finally:
        ws.close()


def _many_at_once(info: dict[str, Any], *, count: int = 8, size: int = 100 * MB) -> Row:
    ws = Workspace(info, "memory-many")
    limit: Limit | None = None
    try:
        addresses = [ws.address(f"many{i}") for i in range(count)]
        ws.consent(addresses)
        rng = random.Random(5)
        for serial, address in enumerate(addresses):
            ws.deliver(address, [make_message(size, serial=serial, rng=rng)])
        limit = _limit(LIMIT)
        figures, code = _run_probe(ws, addresses, limit)
        seen = limit.report()
        if code:
            killed = code == -signal.SIGKILL
            say(f"memory 3b: probe ended with {code}: {figures.get('stderr', '')[-500:]}")
            collected, above = 0, 0.0
        else:
            killed = False
            collected = figures["outcomes"].count("ok")
            above = (figures["peak_kb"] - figures["rss_before_kb"]) * 1024
        say(f"memory 3b: {collected}/{count} collected under {LIMIT // MB} MB ({limit.kind}); {seen}")
        met = code == 0 and collected == count
        return Row(
            f"3b memory, {count} x {size // MB} MB at once under {LIMIT // MB} MB",
            f"{collected}/{count} collected, +{above / MB:.0f} MB peak RSS" + (", killed" if killed else ""),
            f"{count * size // MB} MB of mail",
            above / (count * size) if count * size else 0.0,
            "all collected, none killed",
            met,
            f"{limit.kind}; {seen}; one fresh process, COLLECT_MAX_CONCURRENCY={ws.settings.max_concurrency}, "
            f"COLLECT_MEMORY_BUDGET_MB={ws.settings.memory_budget_mb}",
        )
    finally:
        if limit is not None:
            limit.close()
        ws.close()


def run(info: dict[str, Any]) -> list[Row]:
    return [
        _one_message(info, 25 * MB, goal=int(GOAL * 25 * MB), goal_text=f"<= {GOAL:.0f}x the message", seed=3),
        _one_message(info, 150 * MB, goal=GOAL_150, goal_text=f"<= {GOAL_150 // MB} MB", seed=4),
        _many_at_once(info),
    ]


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1:])))
