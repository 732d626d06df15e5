"""Benchmark 4, cold start: ``import function_app`` against importing its runtime dependencies alone.

Each import runs in a fresh interpreter and times itself (interpreter start-up, the same for both, is left out);
the two kinds alternate and the figures are medians. The app's own modules are compiled on import, as on a
Flex Consumption instance whose package is mounted read-only (``PYTHONDONTWRITEBYTECODE``: no ``__pycache__``
is written, so every run pays the same). A second check imports the app under a ``sitecustomize`` that refuses
every connect() and name lookup, with the app's settings present: importing must not touch the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT, Row, median, say

GOAL = 1.2
DEPENDENCIES = (
    "azure.functions",
    "azure.identity",
    "azure.keyvault.secrets",
    "azure.storage.blob",
    "azure.storage.queue",
    "azure.data.tables",
    "msal",
    "imapclient",
)
TIMED_IMPORT = "import time; t = time.perf_counter(); import {modules}; print(time.perf_counter() - t)"
NO_NETWORK = """
import socket

class NetworkAtImport(RuntimeError):
    pass

def _refuse(*args, **kwargs):
    raise NetworkAtImport("network use while importing the app")

socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(ROOT), **(extra or {}))
    return env


def _timed(modules: str, env: dict[str, str]) -> float:
    done = subprocess.run(
        [sys.executable, "-c", TIMED_IMPORT.format(modules=modules)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"import of {modules} failed: {done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def imports_offline(app_settings: dict[str, str]) -> tuple[bool, str]:
    """Import the app with every connect() refused and its settings in the environment."""
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "sitecustomize.py").write_text(NO_NETWORK)
        env = _env(app_settings)
        env["PYTHONPATH"] = f"{folder}{os.pathsep}{ROOT}"
        probe = (
            "import socket\n"
            "assert socket.socket.connect.__name__ == '_refuse', 'the guard is not installed'\n"
            "import function_app\n"
            "try:\n"
            "    socket.create_connection(('127.0.0.1', 9))\n"
            "except Exception as e:\n"
            "    assert type(e).__name__ == 'NetworkAtImport', e\n"
            "else:\n"
            "    raise AssertionError('the guard let a connection through')\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
        )
    return done.returncode == 0, done.stderr.strip().splitlines()[-1] if done.returncode else ""


def run(info: dict[str, Any], *, repeat: int = 7) -> list[Row]:
    from devstack.stack import app_settings

    env = _env()
    deps, app = [], []
    _timed("function_app", env)  # the first run also warms the OS file cache for both
    for _ in range(repeat):
        deps.append(_timed(", ".join(DEPENDENCIES), env))
        app.append(_timed("function_app", env))
    ratio = median(app) / median(deps)
    offline, error = imports_offline(app_settings(info))
    say(f"cold start: app {median(app) * 1000:.0f} ms, dependencies {median(deps) * 1000:.0f} ms; offline={offline}")
    return [
        Row(
            "4 cold start (import)",
            f"import function_app {median(app) * 1000:.0f} ms",
            f"dependencies alone {median(deps) * 1000:.0f} ms",
            ratio,
            f"<= {GOAL}x",
            ratio <= GOAL,
            f"median of {repeat} fresh interpreters each, alternating; app modules compiled each time",
        ),
        Row(
            "4 cold start (network)",
            "no connect() at import" if offline else f"import touched the network: {error}",
            "-",
            None,
            "no network at import",
            offline,
        ),
    ]
