"""The azd prepackage hook, run for real in a copy of the app: it ships the app's modules as hash-checked bytecode
for the runtime's Python version, so that importing the app from a read-only package compiles none of them."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "infra" / "hooks" / "prepackage.sh"
PACKAGES = ("api", "collectors", "consumers", "shared")
CHECKED_HASH = 0b11  # PEP 552 flags: hash-based, checked against the source

# Loaded before the app: records every module of the copy that Python compiles from source instead of loading
# its bytecode.
RECORD_COMPILES = """
import atexit, os, sys
from importlib import _bootstrap_external as external

root = os.environ["APP_COPY"]
compiled = []
original = external.SourceLoader.source_to_code

def source_to_code(self, data, path, *, _optimize=-1):
    if str(path).startswith(root):
        compiled.append(os.path.relpath(path, root))
    return original(self, data, path, _optimize=_optimize)

external.SourceLoader.source_to_code = source_to_code
atexit.register(lambda: print("COMPILED", sorted(compiled)))
"""


def _copy_app(folder: Path) -> Path:
    app = folder / "app"
    app.mkdir()
    shutil.copy2(ROOT / "function_app.py", app)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
    (app / "infra" / "hooks").mkdir(parents=True)
    shutil.copy2(HOOK, app / "infra" / "hooks")
    return app


def _run_hook(app: Path, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "infra/hooks/prepackage.sh"],
        cwd=app,
        env={"PATH": path, "HOME": str(app)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _compiled_on_import(app: Path, site: Path) -> list[str]:
    """Import the app from ``app`` in a fresh interpreter; the app's modules it had to compile from source."""
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(RECORD_COMPILES, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{app}", PYTHONDONTWRITEBYTECODE="1", APP_COPY=str(app))
    done = subprocess.run(
        [sys.executable, "-c", "import function_app"],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("COMPILED "))
    return re.findall(r"'([^']+)'", line)


def _runtime_python() -> str:
    version = "{}.{}".format(*sys.version_info[:2])
    if version != _bicep_runtime():
        pytest.skip(f"the tests run on Python {version}, the app on {_bicep_runtime()}")
    return str(Path(sys.executable).parent)


def _bicep_runtime() -> str:
    text = (ROOT / "infra" / "app" / "api.bicep").read_text(encoding="utf-8")
    found = re.search(r"runtime: \{\s*name: 'python'\s*version: '([0-9.]+)'", text)
    assert found, "api.bicep names no Python runtime version"
    return found.group(1)


def test_the_hooks_compile_for_the_runtime_the_bicep_deploys() -> None:
    runtime = _bicep_runtime()
    assert f"runtime={runtime}\n" in HOOK.read_text(encoding="utf-8")
    assert f"$runtime = '{runtime}'" in (ROOT / "infra" / "hooks" / "prepackage.ps1").read_text(encoding="utf-8")


def test_the_packaged_app_imports_without_compiling_its_modules(tmp_path: Path) -> None:
    python_dir = _runtime_python()
    app = _copy_app(tmp_path)
    stale = app / "collectors" / "__pycache__"
    stale.mkdir()
    (stale / "collect.cpython-39.pyc").write_bytes(b"left by a local run")

    # The control: from sources alone, the import compiles the app's modules (so the check below can fail).
    plain = tmp_path / "plain"
    shutil.copytree(app, plain)
    assert "collectors/collect.py" in _compiled_on_import(plain, tmp_path / "site")

    done = _run_hook(app, f"{python_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert done.returncode == 0, done.stderr
    assert "compiled for Python" in done.stdout
    assert not stale.joinpath("collect.cpython-39.pyc").exists(), "stale bytecode must not ship"
    sources = [*sorted(p for name in PACKAGES for p in (app / name).rglob("*.py")), app / "function_app.py"]
    for source in sources:
        cached = source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc"
        assert cached.is_file(), f"{source.relative_to(app)} has no bytecode"
        flags = int.from_bytes(cached.read_bytes()[4:8], "little")
        assert flags == CHECKED_HASH, f"{cached.name}: bytecode must be checked by hash, not by file times"

    _read_only(app)
    try:
        assert _compiled_on_import(app, tmp_path / "site") == []
        # A source changed after packaging is compiled again, never run from stale bytecode.
        collect = app / "collectors" / "collect.py"
        collect.chmod(0o644)
        collect.write_text(collect.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
        assert _compiled_on_import(app, tmp_path / "site") == ["collectors/collect.py"]
    finally:
        for path in [app, *app.rglob("*")]:
            path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)


def test_without_the_runtime_python_the_hook_says_so_and_ships_no_bytecode(tmp_path: Path) -> None:
    app = _copy_app(tmp_path)
    stale = app / "shared" / "__pycache__"
    stale.mkdir()
    (stale / "registry.cpython-311.pyc").write_bytes(b"left by a local run")
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("sh", "find", "rm"):
        found = shutil.which(tool)
        assert found, tool
        (tools / tool).symlink_to(found)
    # Another version of Python on the path: its bytecode would be ignored by the runtime, so it is not used.
    other = tools / "python3"
    other.write_text("#!/bin/sh\necho 3.9\n", encoding="utf-8")
    other.chmod(0o755)

    done = _run_hook(app, str(tools))
    assert done.returncode == 0, done.stderr
    assert f"Python {_bicep_runtime()} (the app's runtime) was not found" in done.stdout
    assert not list(app.rglob("*.pyc")), "no bytecode, neither new nor left by local runs"
