"""The Entra ID stand-in and the private Dovecot instance, end to end with the real clients: MSAL signs in through
the stand-in's pages (a requests.Session fills the forms), and imaplib logs in to Dovecot with the access token.

The fixtures here start both parts on free ports from a throwaway folder; the start logic is kept in small
functions so that it can move onto the shared stack fixture.
"""

from __future__ import annotations

import base64
import imaplib
import json
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import msal
import pytest
import requests

from devstack import certs, dovecot
from tests.support.net import free_port, https_ok, wait_until
from tests.support.processes import stop_process
from tests.support.signin import sign_in
from tests.support.standins import ControlClient, tls_session

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
IMAP_SCOPE = "https://outlook.office.com/IMAP.AccessAsUser.All"
# Registered with port 7071; sign-ins use another port, which Entra (and the stand-in) accept for loopback URIs.
REGISTERED_REDIRECT = "http://localhost:7071/api/auth/callback"
REDIRECT = "http://localhost:7999/api/auth/callback"
START_TIMEOUT = 30.0  # seconds; Node loads oidc-provider in about one, Dovecot's first login takes about five
FORM_ACTION = re.compile(r'<form method="post" action="([^"]*)"')


@dataclass(frozen=True)
class Parts:
    origin: str
    tenant: str
    client_id: str
    client_secret: str
    password: str
    ca: Path  # the test CA alone, for ssl contexts
    bundle: Path  # system CAs plus the test CA, for requests
    imap_port: int
    dovecot_config: Path
    folder: Path  # logs: entra.log, dovecot.log


def start_entra(
    folder: Path, *, port: int, tls: dict[str, Path], signing: tuple[Path, Path, str], identity: dict[str, str]
) -> subprocess.Popen[bytes]:
    config = folder / "entra.json"
    config.write_text(json.dumps({
        "host": "127.0.0.1",
        "port": port,
        "public_origin": f"https://localhost:{port}",
        "tls_cert": str(tls["cert"]),
        "tls_key": str(tls["key"]),
        "signing_key": str(signing[0]),
        "signing_kid": signing[2],
        "tenant_id": identity["tenant"],
        "user_password": identity["password"],
        "access_token_ttl_seconds": 3600,
        "clients": [{"client_id": identity["client_id"], "client_secret": identity["client_secret"],
                     "redirect_uris": [REGISTERED_REDIRECT]}],
    }))  # fmt: skip
    log = folder / "entra.log"
    process = subprocess.Popen(
        ["node", str(REPO / "devstack" / "entra" / "server.mjs"), "--config", str(config)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    wait_until(
        lambda: https_ok(f"https://localhost:{port}/_control/health", tls["ca"]),
        START_TIMEOUT,
        "the Entra stand-in",
        process=process,
        log=log,
    )
    return process


def start_dovecot(
    folder: Path, *, port: int, tls: dict[str, Path], signing: tuple[Path, Path, str], issuer: str
) -> tuple[subprocess.Popen[bytes], Path]:
    config = dovecot.write_config(folder, port=port, tls_cert=tls["cert"], tls_key=tls["key"],
                                  signing_public_key=signing[1], signing_kid=signing[2], issuer=issuer)  # fmt: skip
    log = folder / "dovecot.log"
    process = subprocess.Popen(["dovecot", "-F", "-c", str(config)], stdout=log.open("wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    context = ssl.create_default_context(cafile=str(tls["ca"]))

    def greets() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as tls_socket:  # fmt: skip
                return tls_socket.recv(64).startswith(b"* OK")
        except OSError:
            return False

    wait_until(greets, START_TIMEOUT, "Dovecot", process=process, log=log)
    return process, config


@pytest.fixture(scope="module")
def parts() -> Iterator[Parts]:
    # Not tmp_path: pytest's base folder is private to root, and Dovecot's mail processes run as another user.
    folder = Path(tempfile.mkdtemp(prefix="entra-dovecot-"))
    folder.chmod(0o755)
    tls = certs.ensure_certificates(folder / "tls")
    signing = certs.ensure_signing_key(folder / "tls")
    identity = {"tenant": str(uuid.uuid4()), "client_id": str(uuid.uuid4()),
                "client_secret": uuid.uuid4().hex, "password": uuid.uuid4().hex}  # fmt: skip
    entra_port, imap_port = free_port(), free_port()
    started: list[subprocess.Popen[bytes]] = []
    try:
        started.append(start_entra(folder, port=entra_port, tls=tls, signing=signing, identity=identity))
        origin = f"https://localhost:{entra_port}"
        process, config = start_dovecot(folder, port=imap_port, tls=tls, signing=signing,
                                        issuer=f"{origin}/{identity['tenant']}/v2.0")  # fmt: skip
        started.append(process)
        dovecot.warm_up(imap_port, ca_file=tls["ca"], signing_key=signing[0], signing_kid=signing[2],
                        issuer=f"{origin}/{identity['tenant']}/v2.0")  # fmt: skip
        yield Parts(origin, identity["tenant"], identity["client_id"], identity["client_secret"],
                    identity["password"], tls["ca"], tls["bundle"], imap_port, config, folder)  # fmt: skip
    finally:
        for process in reversed(started):
            stop_process(process, group=True)
        shutil.rmtree(folder, ignore_errors=True)


def session(parts: Parts) -> requests.Session:
    return tls_session(parts.bundle)


def control(parts: Parts, path: str, body: dict[str, Any] | None = None, method: str = "POST") -> Any:
    return ControlClient(parts.origin, parts.bundle)(path, body, method)


@pytest.fixture(autouse=True)
def clean_faults(parts: Parts) -> Iterator[None]:
    yield
    ControlClient(parts.origin, parts.bundle).clear_faults()


def new_app(parts: Parts, cache: msal.SerializableTokenCache) -> msal.ConfidentialClientApplication:
    """A fresh MSAL app on the shared cache: MSAL replays an identical failed request's answer for 60 s."""
    return msal.ConfidentialClientApplication(
        parts.client_id, client_credential=parts.client_secret, authority=f"{parts.origin}/{parts.tenant}",
        instance_discovery=False, http_client=session(parts), token_cache=cache,
    )  # fmt: skip


def consent(parts: Parts, address: str) -> tuple[msal.SerializableTokenCache, dict[str, Any]]:
    """Sign in as ``address`` through the stand-in's pages and redeem the code, as the app's callback would."""
    cache = msal.SerializableTokenCache()
    app = new_app(parts, cache)
    flow = app.initiate_auth_code_flow(scopes=[IMAP_SCOPE], redirect_uri=REDIRECT, login_hint=address,
                                       response_mode="form_post")  # fmt: skip
    fields = sign_in(flow["auth_uri"], login=address, password=parts.password, redirect_uri=REDIRECT,
                     session=session(parts))  # fmt: skip
    result = app.acquire_token_by_auth_code_flow(flow, fields)
    assert "access_token" in result, result.get("error_description")
    return cache, result


def refresh_tokens(cache: msal.SerializableTokenCache) -> list[str]:
    return [item["secret"] for item in cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)]


def refresh(parts: Parts, cache: msal.SerializableTokenCache) -> dict[str, Any]:
    app = new_app(parts, cache)
    result: dict[str, Any] = app.acquire_token_silent_with_error(
        [IMAP_SCOPE], account=app.get_accounts()[0], force_refresh=True
    )
    return result


def claims(jwt: str) -> dict[str, Any]:
    part = jwt.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def imap_login(parts: Parts, user: str, token: str, mechanism: str = "XOAUTH2") -> imaplib.IMAP4_SSL:
    """Log in over IMAPS; raises imaplib.IMAP4.error when Dovecot refuses."""
    if mechanism == "XOAUTH2":
        response = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    else:
        response = f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()
    context = ssl.create_default_context(cafile=str(parts.ca))
    imap = imaplib.IMAP4_SSL("localhost", parts.imap_port, ssl_context=context, timeout=30)
    try:
        imap.authenticate(mechanism, lambda _challenge: response)
    except imaplib.IMAP4.error:
        imap.shutdown()
        raise
    return imap


def address() -> str:
    return f"user-{uuid.uuid4().hex[:10]}@example.test"


def test_auth_code_flow_gives_tokens_that_open_the_mailbox(parts: Parts) -> None:
    user = address()
    cache, result = consent(parts, user)

    assert refresh_tokens(cache), "offline_access must yield a refresh token"
    assert result["id_token_claims"]["preferred_username"] == user
    assert result["id_token_claims"]["tid"] == parts.tenant
    assert result["id_token_claims"]["oid"] == str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailto:{user}"))
    access = claims(result["access_token"])
    assert access["aud"] == "https://outlook.office.com"
    assert access["scp"] == "IMAP.AccessAsUser.All"
    assert access["preferred_username"] == access["upn"] == user
    assert access["iss"] == f"{parts.origin}/{parts.tenant}/v2.0"

    # CRLF only and no NUL: Dovecot stores bare LF as CRLF and NUL as 0x80, so such input does not come back as is.
    raw = (
        b"From: Customer <customer@example.org>\r\nTo: support@example.test\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
        b"Message-ID: <" + uuid.uuid4().hex.encode() + b"@example.org>\r\n\r\nline one\r\n\xe9t\xe9 8-bit\r\n"
    )
    dovecot.deliver(parts.dovecot_config, user, raw)
    [uid] = dovecot.list_uids(parts.dovecot_config, user)

    imap = imap_login(parts, user, result["access_token"])
    try:
        typ, data = imap.select("INBOX", readonly=True)
        assert typ == "OK" and data == [b"1"]
        # imaplib keeps the capabilities it saw before login; ask again.
        typ, capabilities = imap.capability()
        assert {b"MOVE", b"UIDPLUS"} <= set(capabilities[0].split())
        typ, fetched = imap.uid("FETCH", str(uid), "(BODY.PEEK[])")
        assert typ == "OK"
        assert fetched[0][1] == raw
    finally:
        imap.logout()

    imap_login(parts, user, result["access_token"], mechanism="OAUTHBEARER").logout()


def test_dovecot_refuses_foreign_expired_and_tampered_tokens(parts: Parts) -> None:
    alice, bob = address(), address()
    _, result = consent(parts, alice)
    token = result["access_token"]

    with pytest.raises(imaplib.IMAP4.error):
        imap_login(parts, bob, token)

    header, _, signature = token.split(".")
    forged = dict(claims(token), preferred_username=bob, upn=bob)
    body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(imaplib.IMAP4.error):
        imap_login(parts, bob, f"{header}.{body}.{signature}")

    carol = address()
    control(parts, "settings", {"access_token_ttl_by_account": {carol: 1}})
    _, short = consent(parts, carol)
    assert short["expires_in"] == 1
    assert consent(parts, address())[1]["expires_in"] == 3600, "another account's lifetime changed too"
    time.sleep(2.5)
    with pytest.raises(imaplib.IMAP4.error):
        imap_login(parts, carol, short["access_token"])

    # No failure delay or per-IP penalty: the good token still gets in at once after three refusals.
    started = time.monotonic()
    imap_login(parts, alice, token).logout()
    assert time.monotonic() - started < 2


def test_refresh_rotates_and_in_strict_mode_the_old_refresh_token_dies(parts: Parts) -> None:
    user = address()
    cache, _ = consent(parts, user)
    control(parts, "settings", {"strict_accounts": [user]})
    [old] = refresh_tokens(cache)

    renewed = refresh(parts, cache)
    assert "access_token" in renewed, renewed.get("error_description")
    [new] = refresh_tokens(cache)
    assert new != old

    replay = new_app(parts, msal.SerializableTokenCache()).acquire_token_by_refresh_token(old, [IMAP_SCOPE])
    assert replay["error"] == "invalid_grant"
    assert replay["error_codes"] == [70000]
    assert "access_token" in refresh(parts, cache), "the rotated token keeps working"


def test_injected_fault_reaches_msal_and_is_used_up(parts: Parts) -> None:
    user = address()
    cache, _ = consent(parts, user)
    control(parts, "faults", {"endpoint": "token", "error": "invalid_grant", "aadsts": 70043, "status": 400,
                              "count": 1, "account": user, "grant_type": "refresh_token"})  # fmt: skip

    failed = refresh(parts, cache)
    assert failed["error"] == "invalid_grant"
    assert failed["error_codes"] == [70043]
    assert failed["error_description"].startswith("AADSTS70043:")

    assert "access_token" in refresh(parts, cache), "a fault with count 1 answers once"
    assert control(parts, "stats", method="GET")["faults_injected"] >= 1


def test_revoked_account_gets_invalid_grant_50173(parts: Parts) -> None:
    user, bystander = address(), address()
    cache, _ = consent(parts, user)
    other_cache, _ = consent(parts, bystander)

    control(parts, "revoke", {"account": user})

    revoked = refresh(parts, cache)
    assert revoked["error"] == "invalid_grant"
    assert revoked["error_codes"] == [50173]
    assert "access_token" in refresh(parts, other_cache), "only the revoked account loses its grant"


def test_client_credentials_token_for_key_vault(parts: Parts) -> None:
    from azure.identity import ClientSecretCredential

    credential = ClientSecretCredential(
        parts.tenant, parts.client_id, parts.client_secret, authority=parts.origin,
        disable_instance_discovery=True, connection_verify=str(parts.bundle),
    )  # fmt: skip
    token = credential.get_token("https://vault.azure.net/.default")
    assert claims(token.token)["aud"] == "https://vault.azure.net"
    assert claims(token.token)["appid"] == parts.client_id


def test_a_key_vault_token_does_not_open_a_mailbox(parts: Parts) -> None:
    user = address()
    consent(parts, user)
    app = new_app(parts, msal.SerializableTokenCache())
    vault = app.acquire_token_for_client(scopes=["https://vault.azure.net/.default"])
    assert claims(vault["access_token"])["aud"] == "https://vault.azure.net"

    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap_login(parts, user, vault["access_token"])


def test_sign_in_pages_show_a_wrong_password_remember_consent_and_report_a_decline(parts: Parts) -> None:
    user = address()
    app = new_app(parts, msal.SerializableTokenCache())

    def start(login_hint: str) -> dict[str, Any]:
        flow: dict[str, Any] = app.initiate_auth_code_flow(
            scopes=[IMAP_SCOPE], redirect_uri=REDIRECT, login_hint=login_hint, response_mode="form_post"
        )
        return flow

    def log_in(browser: requests.Session, flow: dict[str, Any], password: str) -> requests.Response:
        page = browser.get(flow["auth_uri"], timeout=10)
        assert f'name="login" value="{login_hint_of(flow)}"' in page.text
        action = urljoin(page.url, FORM_ACTION.findall(page.text)[0])
        return browser.post(action, data={"login": login_hint_of(flow), "password": password}, timeout=10)

    def login_hint_of(flow: dict[str, Any]) -> str:
        return str(flow["auth_uri"]).split("login_hint=")[1].split("&")[0].replace("%40", "@")

    first = start(user)
    wrong = log_in(session(parts), first, "not-the-password")
    assert 'role="alert"' in wrong.text and "AADSTS50126" in wrong.text
    assert REDIRECT not in wrong.text

    browser = session(parts)
    consent_page = log_in(browser, first, parts.password)
    assert "Accept" in consent_page.text and IMAP_SCOPE in consent_page.text
    answered = browser.post(
        urljoin(consent_page.url, FORM_ACTION.findall(consent_page.text)[0]), data={"decision": "accept"}, timeout=10
    )
    assert FORM_ACTION.findall(answered.text) == [REDIRECT]
    fields = sign_in_fields(answered.text)
    assert "access_token" in app.acquire_token_by_auth_code_flow(first, fields)

    # A new browser signs in again and goes straight back to the app: consent is remembered per user and app.
    second = start(user)
    straight = log_in(session(parts), second, parts.password)
    assert FORM_ACTION.findall(straight.text) == [REDIRECT]
    assert "access_token" in app.acquire_token_by_auth_code_flow(second, sign_in_fields(straight.text))

    third = start(address())
    declined = sign_in(third["auth_uri"], login=login_hint_of(third), password=parts.password, redirect_uri=REDIRECT,
                       session=session(parts), accept=False)  # fmt: skip
    result = app.acquire_token_by_auth_code_flow(third, declined)
    assert result["error"] == "access_denied"
    assert result["error_description"].startswith("AADSTS65004: User declined to consent")


def sign_in_fields(form_post_page: str) -> dict[str, str]:
    return dict(re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)"', form_post_page))


def test_a_foreign_redirect_uri_is_refused_on_the_error_page(parts: Parts) -> None:
    app = new_app(parts, msal.SerializableTokenCache())
    flow = app.initiate_auth_code_flow(scopes=[IMAP_SCOPE], redirect_uri="http://attacker.test/api/auth/callback",
                                       login_hint=address(), response_mode="form_post")  # fmt: skip
    page = session(parts).get(flow["auth_uri"], timeout=10)
    assert page.status_code == 400
    assert "redirect_uri" in page.text
    assert "attacker.test" not in "".join(FORM_ACTION.findall(page.text))


def test_an_authorize_fault_comes_back_to_the_app_as_the_error(parts: Parts) -> None:
    control(parts, "faults", {"endpoint": "authorize", "error": "consent_required", "aadsts": 65001})
    app = new_app(parts, msal.SerializableTokenCache())
    flow = app.initiate_auth_code_flow(scopes=[IMAP_SCOPE], redirect_uri=REDIRECT, login_hint=address(),
                                       response_mode="form_post")  # fmt: skip
    page = session(parts).get(flow["auth_uri"], timeout=10)

    assert FORM_ACTION.findall(page.text) == [REDIRECT]
    result = app.acquire_token_by_auth_code_flow(flow, sign_in_fields(page.text))
    assert result["error"] == "consent_required"
    assert result["error_description"].startswith("AADSTS65001: ")


def test_server_errors_and_slow_answers_are_injected_without_burning_the_refresh_token(parts: Parts) -> None:
    user = address()
    cache, _ = consent(parts, user)
    [token] = refresh_tokens(cache)

    def redeem() -> requests.Response:
        return session(parts).post(f"{parts.origin}/{parts.tenant}/oauth2/v2.0/token", data={
            "grant_type": "refresh_token", "refresh_token": token, "scope": f"{IMAP_SCOPE} offline_access",
            "client_id": parts.client_id, "client_secret": parts.client_secret,
        }, timeout=10)  # fmt: skip

    control(parts, "faults", {"endpoint": "token", "error": "temporarily_unavailable", "account": user,
                              "retry_after": 3})  # fmt: skip
    unavailable = redeem()
    assert unavailable.status_code == 503
    assert unavailable.headers["retry-after"] == "3"
    assert unavailable.json()["error"] == "temporarily_unavailable"
    assert unavailable.json()["error_description"].startswith(f"AADSTS{unavailable.json()['error_codes'][0]}: ")

    control(parts, "faults", {"endpoint": "token", "delay_ms": 1200, "account": user})
    started = time.monotonic()
    slow = redeem()
    assert time.monotonic() - started >= 1.1
    assert slow.status_code == 200, slow.text
    assert slow.json()["refresh_token"] != token


def test_logs_carry_no_token_code_secret_or_password(parts: Parts) -> None:
    user = address()
    cache, result = consent(parts, user)
    imap_login(parts, user, result["access_token"]).logout()
    [token] = refresh_tokens(cache)

    logs = (parts.folder / "entra.log").read_text() + (parts.folder / "dovecot.log").read_text()
    for secret in (result["access_token"], token, parts.client_secret, parts.password):
        assert secret[:20] not in logs
    assert "/oauth2/v2.0/token 200" in logs


def test_the_office365_spelling_of_the_imap_scope_gives_the_same_mailbox_token(parts: Parts) -> None:
    user = address()
    app = new_app(parts, msal.SerializableTokenCache())
    scope = "https://outlook.office365.com/IMAP.AccessAsUser.All"
    flow = app.initiate_auth_code_flow(scopes=[scope], redirect_uri=REDIRECT, login_hint=user,
                                       response_mode="form_post")  # fmt: skip
    fields = sign_in(flow["auth_uri"], login=user, password=parts.password, redirect_uri=REDIRECT,
                     session=session(parts))  # fmt: skip
    result = app.acquire_token_by_auth_code_flow(flow, fields)

    assert claims(result["access_token"])["aud"] == "https://outlook.office.com"
    imap_login(parts, user, result["access_token"]).logout()


@pytest.mark.parametrize(
    "value",
    [[], "x", {"not-an-address": 5}, {"a@example.test": 0}, {"a@example.test": 1.5}, {"a@example.test": "60"}],
)
def test_a_per_account_lifetime_must_name_accounts_and_whole_seconds(parts: Parts, value: Any) -> None:
    r = session(parts).post(
        f"{parts.origin}/_control/settings", json={"access_token_ttl_by_account": value}, timeout=10
    )
    assert r.status_code == 400 and "access_token_ttl_by_account" in r.json()["error"]
