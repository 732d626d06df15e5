"""App-only access in the local stack behaves as Entra and Exchange Online do (sources in docs/fidelity.md): the
Entra stand-in issues client-credentials tokens for https://outlook.office365.com/.default with the roles an admin
consented, to a secret, a certificate or a federated credential, in the home tenant and in a customer tenant; Dovecot
lets such a token into the mailboxes its service principal was granted, and answers every other login as Exchange
does, with a failed AUTHENTICATE.
"""

from __future__ import annotations

import imaplib
import ssl
import uuid
from pathlib import Path
from typing import Any

import jwt
import msal
import pytest

from devstack import dovecot
from devstack.stack import app_object_id
from tests.support.stack import Stack
from tests.support.standins import tls_session

pytestmark = pytest.mark.integration

APP_SCOPE = ["https://outlook.office365.com/.default"]


def app_for(stack: Stack, credential: Any, tenant: str | None = None) -> msal.ConfidentialClientApplication:
    session = tls_session(stack.ca_bundle)
    return msal.ConfidentialClientApplication(
        stack.client_id,
        client_credential=credential,
        authority=f"{stack.entra_origin}/{tenant or stack.tenant_id}",
        instance_discovery=False,
        http_client=session,
    )


def app_token(stack: Stack, credential: Any = None, tenant: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = app_for(stack, credential or stack.client_secret, tenant).acquire_token_for_client(
        APP_SCOPE
    )
    return result


def login(stack: Stack, mailbox: str, token: str) -> str:
    """OK after a SELECT of INBOX, or the server's refusal."""
    context = ssl.create_default_context(cafile=stack.ca)
    with imaplib.IMAP4_SSL("localhost", stack.imap_port, ssl_context=context, timeout=30) as imap:
        try:
            imap.authenticate("XOAUTH2", dovecot.sasl_answer(dovecot.xoauth2(mailbox, token)))
        except imaplib.IMAP4.error as e:
            return f"NO {e}"
        status, _ = imap.select("INBOX")
        return str(status)


def certificate(stack: Stack, *, public: bool = False) -> dict[str, str]:
    key = Path(stack.app_certificate_key).read_text()
    if public:  # MSAL then names the certificate by its SHA-256 thumbprint
        return {"private_key": key, "public_certificate": Path(stack.app_certificate).read_text()}
    return {"private_key": key, "thumbprint": stack.app_certificate_thumbprint}


def managed_identity_assertion(stack: Stack) -> str:
    session = tls_session(stack.ca_bundle)
    answer = session.get(
        stack.identity_endpoint,
        params={"api-version": "2019-08-01", "resource": "api://AzureADTokenExchange",
                "client_id": stack.managed_identity_client_id},
        headers={"X-IDENTITY-HEADER": stack.identity_header},
        timeout=10,
    )  # fmt: skip
    answer.raise_for_status()
    return str(answer.json()["access_token"])


@pytest.mark.parametrize("credential", ["secret", "certificate", "certificate_sha256", "federated"])
def test_each_client_credential_gets_an_app_token_with_the_consented_role(stack: Stack, credential: str) -> None:
    chosen: Any = {
        "secret": stack.client_secret,
        "certificate": certificate(stack),
        "certificate_sha256": certificate(stack, public=True),
        "federated": {"client_assertion": lambda: managed_identity_assertion(stack)},
    }[credential]
    result = app_token(stack, chosen)
    assert "access_token" in result, result.get("error_description")
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert claims["aud"] == "https://outlook.office365.com"
    assert claims["roles"] == ["IMAP.AccessAsApp"]
    assert claims["idtyp"] == "app"
    assert claims["oid"] == app_object_id(stack.info), "oid is the enterprise application's object id"
    assert "preferred_username" not in claims and "scp" not in claims


def test_a_certificate_the_app_registration_does_not_know_is_refused(stack: Stack, tmp_path: Path) -> None:
    from devstack import certs

    key, _cert, thumbprint = certs.ensure_client_certificate(tmp_path)
    result = app_token(stack, {"private_key": key.read_text(), "thumbprint": thumbprint})
    assert result.get("error") == "invalid_client"
    assert result["error_codes"] == [700027]


def test_a_scope_other_than_dot_default_is_refused_as_entra_does(stack: Stack) -> None:
    result = app_for(stack, stack.client_secret).acquire_token_for_client(
        ["https://outlook.office365.com/IMAP.AccessAsApp"]
    )
    assert result.get("error") == "invalid_scope"
    assert result["error_codes"] == [1002012]


def test_an_app_not_consented_in_a_tenant_is_unknown_there(stack: Stack) -> None:
    session = tls_session(stack.ca_bundle)
    stranger = msal.ConfidentialClientApplication(
        str(uuid.uuid4()),
        client_credential="not-a-secret",
        authority=f"{stack.entra_origin}/{stack.other_tenant_id}",
        instance_discovery=False,
        http_client=session,
    )
    result = stranger.acquire_token_for_client(APP_SCOPE)
    assert result.get("error") == "unauthorized_client"
    assert result["error_codes"] == [700016]


def test_exchange_lets_the_app_into_granted_mailboxes_only(stack: Stack, new_address: Any) -> None:
    granted, other = new_address(), new_address()
    dovecot.grant_app(Path(stack.dovecot_config), app_object_id(stack.info), granted)
    token = app_token(stack)["access_token"]

    assert login(stack, granted, token) == "OK"
    refused = login(stack, other, token)
    assert refused.startswith("NO") and "Authentication failed" in refused

    dovecot.revoke_app(Path(stack.dovecot_config), app_object_id(stack.info), granted)
    assert login(stack, granted, token).startswith("NO"), "Remove-MailboxPermission takes the access back"


def test_a_grant_is_per_tenant_service_principal(stack: Stack, new_address: Any) -> None:
    mailbox = new_address()
    customer = stack.other_tenant_id
    home_token = app_token(stack)["access_token"]
    customer_result = app_token(stack, tenant=customer)
    assert "access_token" in customer_result, customer_result.get("error_description")
    claims = jwt.decode(customer_result["access_token"], options={"verify_signature": False})
    assert (claims["tid"], claims["oid"]) == (customer, app_object_id(stack.info, customer))

    dovecot.grant_app(Path(stack.dovecot_config), app_object_id(stack.info, customer), mailbox)

    assert login(stack, mailbox, customer_result["access_token"]) == "OK"
    assert login(stack, mailbox, home_token).startswith("NO"), "the home tenant's service principal was not granted"


def test_a_token_without_the_role_is_refused_even_for_a_granted_mailbox(stack: Stack, new_address: Any) -> None:
    mailbox = new_address()
    tenant = stack.unconsented_tenant_id
    result = app_token(stack, tenant=tenant)
    assert "access_token" in result, "Entra issues the token: it just carries no roles"
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert "roles" not in claims
    dovecot.grant_app(Path(stack.dovecot_config), app_object_id(stack.info, tenant), mailbox)

    assert login(stack, mailbox, result["access_token"]).startswith("NO")


def test_a_delegated_token_cannot_use_an_application_grant(stack: Stack, new_address: Any) -> None:
    """A user's token for another mailbox stays refused, whatever the grant list holds."""
    mailbox, user = new_address(), new_address()
    token = dovecot._mint_token(Path(stack.signing_key), stack.signing_kid, stack.issuer, user)
    dovecot.grant_app(Path(stack.dovecot_config), app_object_id(stack.info), mailbox)
    assert login(stack, user, token) == "OK"
    assert login(stack, mailbox, token).startswith("NO")
