"""The local stack tells which part is missing instead of letting tests hang."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from devstack import stack as devstack
from tests.conftest import dead_parts

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(30)
def test_dead_parts_are_named_without_hanging(stack: dict[str, Any]) -> None:
    assert dead_parts(stack) == []
    broken = {**stack, "ports": {**stack["ports"], "imaps": _closed_port()}}
    broken["key_vault_uri"] = f"https://localhost:{_closed_port()}"
    assert dead_parts(broken) == ["keyvault", "dovecot"]


@pytest.mark.timeout(60)
def test_a_part_that_cannot_start_is_named_with_its_log(
    stack: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    monkeypatch.setenv("STACK_DIR", str(tmp_path))
    monkeypatch.setenv("STACK_KEYVAULT_PORT", str(port))
    try:
        with pytest.raises(devstack.StackError, match=r"(?s)keyvault exited.*Address already in use"):
            devstack.start(parts=("keyvault",))
    finally:
        squatter.close()
