"""The test harness stays in one place: tests take free ports, the Azurite key and the stand-ins' control clients
from tests/support. (The stack fixture is typed, tests/support/stack.py: it answers attributes only, which mypy and
a reader can check, and a test that still reads it by name fails.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from devstack.stack import Ports
from tests.support.stack import Stack

TESTS = Path(__file__).resolve().parent.parent
HARNESS = TESTS / "support"
# What tests/support provides, recognised by the lines that would write it again elsewhere.
REWRITTEN = {
    "a free port (use tests.support.net.free_port)": re.compile(r"\.bind\(\(\"127\.0\.0\.1\", 0\)\)"),
    "the Azurite key (use tests.support.azurite.ACCOUNT_KEY)": re.compile(r"Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50"),
    "a stand-in's control URL (use tests.support.standins.ControlClient)": re.compile(r"/_control/\{|/_control/\""),
}
ALLOWED = {TESTS / "integration" / "test_stack_health.py"}  # binds a port on purpose to keep it busy


def _test_sources() -> list[Path]:
    return [p for p in sorted(TESTS.rglob("*.py")) if HARNESS not in p.parents and p != Path(__file__).resolve()]


def test_tests_take_the_harness_from_tests_support() -> None:
    sources = _test_sources()
    assert len(sources) > 30, "the test sources were not found"
    found = [
        f"{path.relative_to(TESTS)}:{number}: {what}"
        for path in sources
        if path not in ALLOWED
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for what, pattern in REWRITTEN.items()
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_check_finds_what_it_looks_for() -> None:
    samples = {
        's.bind(("127.0.0.1", 0))': "a free port",
        'f"{origin}/_control/{path}"': "a stand-in's control URL",
    }
    for line, what in samples.items():
        assert any(pattern.search(line) for name, pattern in REWRITTEN.items() if name.startswith(what)), line
    assert not any(pattern.search('f"{origin}/_control/health"') for pattern in REWRITTEN.values())


def test_the_stack_fixture_answers_attributes_only() -> None:
    names = [name for name in Stack.__dataclass_fields__ if name not in ("info", "ports")]
    info: dict[str, object] = dict.fromkeys(names, "x")
    info["ports"] = {field: 1 for field in Ports.__dataclass_fields__}
    stack = Stack.from_info(info)
    assert stack.ca == "x"
    with pytest.raises(TypeError):
        stack["ca"]  # type: ignore[index]
