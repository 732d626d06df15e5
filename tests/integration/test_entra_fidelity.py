"""The Entra ID stand-in behaves as Entra does where the app depends on it (sources in docs/fidelity.md):
refresh-token rotation that does not revoke the redeemed token, revocations by reason, access tokens of a random
60 to 90 minutes, error bodies with suberror and claims, and federated client assertions from the managed-identity
endpoint with the federated credential's own error codes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import msal
import pytest
import requests

from tests.support.signin import sign_in
from tests.support.stack import Stack
from tests.support.standins import tls_session

pytestmark = pytest.mark.integration

IMAP_SCOPE = "https://outlook.office.com/IMAP.AccessAsUser.All"
EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"


@pytest.fixture
def entra(stack: Stack, entra_control: Callable[..., Any]) -> Callable[..., Any]:
    # No test here changes the stand-in's global settings: lifetimes and strict rotation are set per account.
    return entra_control


def app_for(stack: Stack, cache: msal.TokenCache, credential: Any = None) -> msal.ConfidentialClientApplication:
    session = tls_session(stack.ca_bundle)
    return msal.ConfidentialClientApplication(
        stack.client_id,
        client_credential=credential or stack.client_secret,
        authority=f"{stack.entra_origin}/{stack.tenant_id}",
        instance_discovery=False,
        http_client=session,
        token_cache=cache,
    )


def consented(stack: Stack, entra_session: requests.Session, user: str) -> msal.SerializableTokenCache:
    cache = msal.SerializableTokenCache()
    app = app_for(stack, cache)
    redirect = f"{stack.host_origin}/api/auth/callback"
    flow = app.initiate_auth_code_flow([IMAP_SCOPE], redirect_uri=redirect, login_hint=user, response_mode="form_post")
    fields = sign_in(flow["auth_uri"], login=user, password=stack.user_password, redirect_uri=redirect,
                     session=entra_session)  # fmt: skip
    result = app.acquire_token_by_auth_code_flow(flow, fields)
    assert "access_token" in result, result.get("error_description")
    return cache


def refresh_token(cache: msal.SerializableTokenCache) -> str:
    [item] = cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)
    return str(item["secret"])


def redeem(stack: Stack, token: str) -> dict[str, Any]:
    """Redeem one refresh token on a fresh cache (no MSAL replay of an earlier answer)."""
    result: dict[str, Any] = app_for(stack, msal.SerializableTokenCache()).acquire_token_by_refresh_token(
        token, [IMAP_SCOPE]
    )
    return result


def test_a_redeemed_refresh_token_stays_valid_and_each_redemption_rotates(
    stack: Stack, entra: Any, entra_session: requests.Session, new_address: Any
) -> None:
    cache = consented(stack, entra_session, new_address())
    first = refresh_token(cache)

    renewed = redeem(stack, first)
    second = renewed["refresh_token"]
    assert second != first, "Entra returns a new refresh token at every redemption"
    again = redeem(stack, first)
    assert "access_token" in again, f"the redeemed token is not revoked: {again.get('error_description')}"
    assert again["refresh_token"] not in (first, second)
    assert "access_token" in redeem(stack, second)


def test_the_strict_mode_refuses_a_redeemed_refresh_token(
    stack: Stack, entra: Any, entra_session: requests.Session, new_address: Any
) -> None:
    user, bystander = new_address(), new_address()
    cache, other = consented(stack, entra_session, user), consented(stack, entra_session, bystander)
    entra("settings", {"strict_accounts": [user]})
    first = refresh_token(cache)
    second = redeem(stack, first)["refresh_token"]

    replay = redeem(stack, first)
    assert (replay["error"], replay["error_codes"]) == ("invalid_grant", [70000])
    assert "access_token" in redeem(stack, second)
    other_first = refresh_token(other)
    redeem(stack, other_first)
    assert "access_token" in redeem(stack, other_first), "only the named account rotates strictly"
    entra("settings", {"entra_accounts": [user]})


@pytest.mark.parametrize(
    ("reason", "code"),
    [("password_reset", 50173), ("revoke_sessions", 50173), ("sign_in_frequency", 70043), ("inactivity", 700082)],
)
def test_a_revocation_kills_every_refresh_token_of_the_account_with_its_code(
    stack: Stack, entra: Any, entra_session: requests.Session, new_address: Any, reason: str, code: int
) -> None:
    user = new_address()
    cache = consented(stack, entra_session, user)
    first = refresh_token(cache)
    second = redeem(stack, first)["refresh_token"]

    entra("revoke", {"account": user, "reason": reason})

    for token in (first, second):
        refused = redeem(stack, token)
        assert (refused["error"], refused["error_codes"]) == ("invalid_grant", [code])
        assert refused["suberror"] == "bad_token"


def test_access_tokens_live_a_random_60_to_90_minutes(
    stack: Stack, entra: Any, entra_session: requests.Session, new_address: Any
) -> None:
    # The stack's stand-in keeps Entra's random lifetimes; tests that need another set it for their own account.
    first = refresh_token(consented(stack, entra_session, new_address()))
    lifetimes = {int(redeem(stack, first)["expires_in"]) for _ in range(8)}
    assert all(3600 <= t <= 5400 for t in lifetimes), lifetimes
    assert len(lifetimes) > 1, "every token got the same lifetime"


@pytest.mark.parametrize(
    ("code", "suberror"), [(53003, "message_only"), (50076, "basic_action"), (50079, "basic_action")]
)
def test_conditional_access_and_mfa_errors_carry_suberror_and_a_claims_challenge(
    stack: Stack, entra: Any, entra_session: requests.Session, new_address: Any, code: int, suberror: str
) -> None:
    user = new_address()
    first = refresh_token(consented(stack, entra_session, user))
    entra("faults", {"error": "invalid_grant", "aadsts": code, "account": user, "grant_type": "refresh_token"})

    refused = redeem(stack, first)

    assert (refused["error"], refused["error_codes"], refused["suberror"]) == ("invalid_grant", [code], suberror)
    assert refused["error_description"].startswith(f"AADSTS{code}:")
    assert '"capolids"' in refused["claims"]


def managed_identity_token(stack: Stack, resource: str = EXCHANGE_AUDIENCE, **query: str) -> requests.Response:
    session = tls_session(stack.ca_bundle)
    params = {"api-version": "2019-08-01", "resource": resource, "client_id": stack.managed_identity_client_id}
    return session.get(stack.identity_endpoint, params={**params, **query},
                       headers={"X-IDENTITY-HEADER": stack.identity_header}, timeout=10)  # fmt: skip


def forged_assertion(stack: Stack, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": stack.issuer, "sub": stack.managed_identity_principal_id, "aud": EXCHANGE_AUDIENCE,
               "iat": now, "nbf": now, "exp": now + 600, **claims}  # fmt: skip
    with open(stack.signing_key, "rb") as fh:
        key = fh.read()
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": stack.signing_kid})


def test_a_managed_identity_token_is_a_client_assertion_the_app_registration_trusts(stack: Stack, entra: Any) -> None:
    answer = managed_identity_token(stack)
    assert answer.status_code == 200
    assertion = answer.json()["access_token"]
    claims = jwt.decode(assertion, options={"verify_signature": False})
    assert (claims["aud"], claims["sub"]) == (EXCHANGE_AUDIENCE, stack.managed_identity_principal_id)

    result = app_for(stack, msal.TokenCache(), {"client_assertion": lambda: assertion}).acquire_token_for_client(
        ["https://vault.azure.net/.default"]
    )
    assert "access_token" in result, result.get("error_description")


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"iss": "https://sts.windows.net/elsewhere/"}, 700211),
        ({"aud": "api://AzureADTokenExchangeUSGov"}, 700212),
        ({"sub": str(uuid.uuid4())}, 700213),
        ({"exp": int(time.time()) - 60}, 700024),
    ],
    ids=["issuer", "audience", "subject", "expired"],
)
def test_an_assertion_that_matches_no_federated_credential_gets_its_code(
    stack: Stack, entra: Any, claims: dict[str, Any], code: int
) -> None:
    assertion = forged_assertion(stack, **claims)
    credential = {"client_assertion": lambda: assertion}
    result = app_for(stack, msal.TokenCache(), credential).acquire_token_for_client(
        ["https://vault.azure.net/.default"]
    )
    assert result["error_codes"] == [code], result.get("error_description")


def test_the_managed_identity_endpoint_refuses_an_unknown_identity_and_a_missing_header(
    stack: Stack, entra: Any
) -> None:
    unknown = managed_identity_token(stack, client_id=str(uuid.uuid4()))
    assert unknown.status_code == 400 and "Managed Identity" in unknown.json()["message"]
    no_header = requests.get(stack.identity_endpoint, params={"resource": EXCHANGE_AUDIENCE},
                             verify=stack.ca_bundle, timeout=10)  # fmt: skip
    assert no_header.status_code == 401
    entra("faults", {"endpoint": "msi", "status": 503})
    assert managed_identity_token(stack).status_code == 503
    assert managed_identity_token(stack).status_code == 200
