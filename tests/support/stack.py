"""The running local stack as tests see it: one typed object instead of the description's dictionary."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from devstack.stack import Ports


@dataclass(frozen=True)
class Stack:
    """What ``devstack.stack.start()`` describes. Paths are text, as the clients take them. ``info`` is the raw
    description, for the helpers in ``devstack.stack`` that take it (``isolated_settings``, ``app_settings``)."""

    info: dict[str, Any] = field(repr=False)
    run_dir: str
    ports: Ports
    ca: str  # the test CA alone, for ssl contexts
    ca_bundle: str  # system CAs plus the test CA, for requests and the app
    tls_cert: str
    tls_key: str
    signing_key: str
    signing_public_key: str
    signing_kid: str
    entra_origin: str
    issuer: str
    tenant_id: str
    client_id: str
    client_secret: str = field(repr=False)
    user_password: str = field(repr=False)
    identity_endpoint: str
    identity_header: str = field(repr=False)
    managed_identity_client_id: str
    managed_identity_principal_id: str
    key_vault_uri: str
    imap_host: str
    imap_port: int
    storage_connection_string: str = field(repr=False)
    host_origin: str
    glpi_url: str  # the GLPI stand-in's apirest.php
    dovecot_config: str

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> Stack:
        """Build from the description; raises KeyError naming a field the description lacks."""
        names = [name for name in cls.__dataclass_fields__ if name not in ("info", "ports")]
        return cls(info=dict(info), ports=Ports(**info["ports"]), **{name: info[name] for name in names})

    def __getitem__(self, name: str) -> Any:
        """The description's field ``name``. Only for tests written against the old dictionary fixture while they
        move to the attributes; new code uses the attributes, which mypy checks."""
        return self.info[name]
