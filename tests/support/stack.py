"""The running local stack as tests see it: one typed object instead of the description's dictionary.

A field added to ``devstack.stack.describe()`` gets an attribute here too; ``test_stack_fixture_covers_the_description``
(tests/integration/test_stack_health.py) fails until it has one.
"""

from __future__ import annotations

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
    # TLS: the test CA alone (for ssl contexts), with the system CAs (for requests and the app), the server's pair
    ca: str
    ca_bundle: str
    tls_cert: str
    tls_key: str
    # the Entra stand-in: its token signing key, the tenants, the app registration and its credentials
    signing_key: str
    signing_public_key: str
    signing_kid: str
    entra_origin: str
    issuer: str
    tenant_id: str
    other_tenant_id: str
    unconsented_tenant_id: str
    client_id: str
    client_secret: str = field(repr=False)
    app_certificate: str
    app_certificate_key: str = field(repr=False)
    app_certificate_thumbprint: str
    user_password: str = field(repr=False)
    # the function app's managed identity and the platform's endpoint for its tokens
    identity_endpoint: str
    identity_header: str = field(repr=False)
    managed_identity_client_id: str
    managed_identity_principal_id: str
    # the other parts
    key_vault_uri: str
    imap_host: str
    imap_port: int
    dovecot_config: str
    storage_connection_string: str = field(repr=False)
    host_origin: str
    function_key: str = field(repr=False)
    master_key: str = field(repr=False)
    glpi_url: str  # the GLPI stand-in's apirest.php
    glpi_app_token: str = field(repr=False)
    glpi_user_token: str = field(repr=False)

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> Stack:
        """Build from the description; raises KeyError naming a field the description lacks."""
        names = [name for name in cls.__dataclass_fields__ if name not in ("info", "ports")]
        return cls(info=dict(info), ports=Ports(**info["ports"]), **{name: info[name] for name in names})
