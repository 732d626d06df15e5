"""Clients of the stand-ins' control APIs (``<origin>/_control/...``: faults, settings, stats, revocations), the
same for the Entra ID and the Key Vault stand-ins, over a session that trusts the stack's test CA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

CONTROL_TIMEOUT_SECONDS = 10


def tls_session(ca_bundle: str | Path) -> requests.Session:
    """A requests session that verifies against ``ca_bundle`` (system CAs plus the test CA). ``trust_env`` is off:
    REQUESTS_CA_BUNDLE, set on this machine, would otherwise override ``verify``."""
    session = requests.Session()
    session.trust_env = False
    session.verify = str(ca_bundle)
    return session


class ControlClient:
    """``control("faults", {...})``, ``control("stats", method="GET")``: one call to a stand-in's control API,
    returning its JSON answer (None when it has no body). Raises requests.HTTPError when the stand-in refuses."""

    def __init__(self, origin: str, ca_bundle: str | Path, *, session: requests.Session | None = None) -> None:
        self.origin = origin.rstrip("/")
        self._session = session or tls_session(ca_bundle)

    def __call__(self, path: str, body: dict[str, Any] | None = None, method: str = "POST") -> Any:
        answer = self._session.request(
            method, f"{self.origin}/_control/{path}", json=body, timeout=CONTROL_TIMEOUT_SECONDS
        )
        answer.raise_for_status()
        return answer.json() if answer.content else None

    def faults(self) -> list[dict[str, Any]]:
        """The faults still pending."""
        return list(self("faults", method="GET")["faults"])

    def add_fault(self, **fault: Any) -> Any:
        return self("faults", fault)

    def clear_faults(self) -> None:
        self("faults", method="DELETE")
