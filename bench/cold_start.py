"""Benchmark 4, cold start: ``import function_app`` against importing its runtime dependencies alone.

Each import runs in a fresh interpreter and times itself (interpreter start-up, the same for both, is left out);
the kinds alternate and the figures are medians. The app is imported from two copies of what azd packages, as on a
Flex Consumption instance whose package is mounted read-only (``PYTHONDONTWRITEBYTECODE``: no ``__pycache__`` is
written, so every run pays the same): the package as the prepackage hook leaves it (the app's modules compiled to
hash-checked bytecode, as pip compiles the dependencies), and the sources alone (a package made without the
runtime's Python, whose every cold start compiles the app's modules). A second check imports the app under a
``sitecustomize`` that refuses every connect() and name lookup, with the app's settings present: importing must not
touch the network.
"""

from __future__ import annotations

import os
import shutil
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


SHIPPED = ("function_app.py", "api", "collectors", "consumers", "shared")


def _env(extra: dict[str, str] | None = None, root: Path = ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(root), **(extra or {}))
    return env


def _package(folder: Path, *, compiled: bool) -> Path:
    """A copy of the app's shipped modules; ``compiled``: with the prepackage hook run over it, as azd runs it."""
    copy = folder / ("packaged" if compiled else "sources")
    copy.mkdir()
    for name in SHIPPED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, copy / name)
    if compiled:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
        done = subprocess.run(
            ["sh", str(ROOT / "infra" / "hooks" / "prepackage.sh")],
            cwd=copy,
            env={"PATH": path, "HOME": str(folder)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0 or "compiled for Python" not in done.stdout:
            raise RuntimeError(f"the prepackage hook did not compile the app: {done.stdout}{done.stderr}")
    return copy


def _timed(modules: str, env: dict[str, str]) -> float:
    done = subprocess.run(
        [sys.executable, "-c", TIMED_IMPORT.format(modules=modules)],
        cwd=env["PYTHONPATH"].split(os.pathsep)[-1],
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


def _runtime() -> str:
    text = (ROOT / "infra" / "hooks" / "prepackage.sh").read_text(encoding="utf-8")
    return text.split("\nruntime=", 1)[1].split("\n", 1)[0]


def run(info: dict[str, Any], *, repeat: int = 7) -> list[Row]:
    from devstack.stack import app_settings

    with tempfile.TemporaryDirectory() as folder:
        sources = _env(root=_package(Path(folder), compiled=False))
        packaged = _env(root=_package(Path(folder), compiled=True))
        deps, app, shipped = [], [], []
        _timed("function_app", sources)  # the first runs also warm the OS file cache
        _timed("function_app", packaged)
        for _ in range(repeat):
            deps.append(_timed(", ".join(DEPENDENCIES), sources))
            shipped.append(_timed("function_app", packaged))
            app.append(_timed("function_app", sources))
    ratio, shipped_ratio = median(app) / median(deps), median(shipped) / median(deps)
    offline, error = imports_offline(app_settings(info))
    say(
        f"cold start: app {median(shipped) * 1000:.0f} ms packaged, {median(app) * 1000:.0f} ms from sources, "
        f"dependencies {median(deps) * 1000:.0f} ms; offline={offline}"
    )
    dependencies = f"dependencies alone {median(deps) * 1000:.0f} ms"
    note = f"median of {repeat} fresh interpreters each, alternating"
    return [
        Row(
            "4 cold start (import, packaged)",
            f"import function_app {median(shipped) * 1000:.0f} ms",
            dependencies,
            shipped_ratio,
            f"<= {GOAL}x",
            shipped_ratio <= GOAL,
            f"{note}; the package as the prepackage hook leaves it (hash-checked bytecode)",
        ),
        Row(
            "4 cold start (import, sources only)",
            f"import function_app {median(app) * 1000:.0f} ms",
            dependencies,
            ratio,
            f"<= {GOAL}x",
            ratio <= GOAL,
            f"{note}; app modules compiled each time (a package made without Python {_runtime()})",
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
