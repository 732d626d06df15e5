"""The local stack tells which part is missing instead of letting tests hang."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest

from devstack import stack as devstack
from tests.conftest import dead_parts
from tests.support.net import free_port
from tests.support.stack import Stack

pytestmark = pytest.mark.integration


@pytest.mark.timeout(30)
def test_dead_parts_are_named_without_hanging(stack: Stack) -> None:
    assert dead_parts(stack) == []
    broken = replace(
        stack, ports=replace(stack.ports, imaps=free_port()), key_vault_uri=f"https://localhost:{free_port()}"
    )
    assert dead_parts(broken) == ["keyvault", "dovecot"]


@pytest.mark.timeout(60)
def test_a_part_that_cannot_start_is_named_with_its_log(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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


def test_stack_fixture_covers_the_description(stack: Stack) -> None:
    described = set(stack.info)
    assert len(described) > 20, "the stack description was not read"
    missing = described - set(Stack.__dataclass_fields__)
    assert not missing, f"tests/support/stack.py: add an attribute for {sorted(missing)}"


def test_azurite_runs_with_lookups_that_do_not_grow_with_the_account(stack: Stack) -> None:
    # devstack/azurite_lookups.cjs (tests/unit/test_azurite_lookups.py checks what it does, docs/fidelity.md why).
    pid = devstack._running_pid("azurite")
    assert pid is not None
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert command[1:3] == [b"--require", str(devstack.REPO / "devstack" / "azurite_lookups.cjs").encode()]
