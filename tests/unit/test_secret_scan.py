"""The secret scan must be able to fail: fed text that holds a secret, it names the secret's kind and place."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import quote

from shared.redaction import RedactingFilter
from tests.support.secret_scan import (
    find_leaks,
    secrets_in_keyvault_state,
    secrets_in_token_cache,
    xoauth2_base64,
)

ROOT = Path(__file__).resolve().parent.parent.parent

HEADER = base64.urlsafe_b64encode(b'{"alg":"RS256","typ":"JWT","kid":"k1"}').rstrip(b"=").decode()


def jwt(subject: str) -> str:
    payload = base64.urlsafe_b64encode(json.dumps({"sub": subject, "jti": subject * 3}).encode()).rstrip(b"=")
    return f"{HEADER}.{payload.decode()}.{'s' * 20}{subject}"


ACCESS = jwt("mailbox-one")
OTHER = jwt("mailbox-two")  # same header, another token
REFRESH = "0.AXYZ" + "r" * 60
CACHE = json.dumps(
    {
        "AccessToken": {"k": {"credential_type": "AccessToken", "secret": ACCESS}},
        "RefreshToken": {"k": {"credential_type": "RefreshToken", "secret": REFRESH}},
        "IdToken": {"k": {"credential_type": "IdToken", "secret": OTHER}},
        "Account": {"k": {"username": "a@example.test"}},
    }
)


def test_a_token_in_a_log_is_flagged_with_its_kind_prefix_and_line() -> None:
    log = f"first line\nsecond line\n2026-01-01 DEBUG msal token={ACCESS} received\n"
    leaks = find_leaks([("app.log", log)], {ACCESS: "access token"})
    assert [(leak.kind, leak.prefix, leak.source, leak.line) for leak in leaks] == [
        ("access token", ACCESS[:6], "app.log", 3)
    ]
    assert ACCESS not in str(leaks[0])


def test_every_position_and_both_short_and_long_values_are_found() -> None:
    secrets = {ACCESS: "access token", "pw-1234567": "user password"}
    for shift in range(17):  # the text is sampled every few characters: no alignment may hide a token
        text = "x" * shift + ACCESS + " and pw-1234567"
        assert {leak.kind for leak in find_leaks([("t", text)], secrets)} == {"access token", "user password"}


def test_url_encoded_and_json_escaped_forms_are_found() -> None:
    sasl = xoauth2_base64("a@example.test", ACCESS)
    secret = sasl + "+/"  # characters that change when URL-encoded or JSON-escaped
    encoded = quote(secret, safe="")
    escaped = secret.replace("/", "\\/")
    assert len(find_leaks([("url", f"GET /?x={encoded}")], {secret: "SASL"})) == 1
    assert len(find_leaks([("json", f'{{"x": "{escaped}"}}')], {secret: "SASL"})) == 1


def test_a_token_of_the_same_issuer_is_not_mistaken_for_another() -> None:
    assert find_leaks([("log", f"token {OTHER}")], {ACCESS: "access token"}) == []
    assert find_leaks([("log", f"token {ACCESS[:-3]}")], {ACCESS: "access token"}) == []


def test_what_the_redaction_filter_lets_through_is_scanned_after_it() -> None:
    record = logging.LogRecord("msal", logging.DEBUG, __file__, 1, "response %s and %s", (ACCESS, REFRESH), None)
    RedactingFilter().filter(record)
    assert find_leaks([("log", record.getMessage())], {ACCESS: "access token", REFRESH: "refresh token"}) == []
    unfiltered = "response {} and {}".format(ACCESS, "opaque-refresh-token-without-marker")
    leaks = find_leaks([("log", unfiltered)], {"opaque-refresh-token-without-marker": "refresh token"})
    assert [leak.kind for leak in leaks] == ["refresh token"]


def test_tokens_and_sasl_strings_come_out_of_a_key_vault_state_file(tmp_path: Path) -> None:
    state = tmp_path / "keyvault.json"
    version = {"value": CACHE, "tags": {"mailbox": "shared@example.test", "signed-in-as": "a@example.test"}}
    state.write_text(
        json.dumps(
            {
                "secrets": {"mbx": {"versions": [version]}, "plain": {"versions": [{"value": "client-secret-value"}]}},
                "deleted": {},
            }
        )
    )
    found = secrets_in_keyvault_state(state)
    assert found[ACCESS] == "access token" and found[REFRESH] == "refresh token" and found[OTHER] == "id token"
    assert found[xoauth2_base64("shared@example.test", ACCESS)] == "SASL XOAUTH2 string"
    assert found[xoauth2_base64("a@example.test", ACCESS)] == "SASL XOAUTH2 string"
    assert found["client-secret-value"] == "Key Vault secret"
    assert secrets_in_token_cache("not json", ["a"]) == {}


def test_the_plugin_fails_a_session_that_leaks_and_passes_one_that_does_not(tmp_path: Path) -> None:
    stack_dir = tmp_path / "stack"
    (stack_dir / "logs").mkdir(parents=True)
    (stack_dir / "stack.json").write_text(json.dumps({"client_secret": "the-client-secret-42"}))
    (stack_dir / "keyvault.json").write_text(
        json.dumps({"secrets": {"mbx": {"versions": [{"value": CACHE, "tags": {}}]}}, "deleted": {}})
    )
    (stack_dir / "logs" / "entra.log").write_text("POST /token 200\n")
    session = tmp_path / "session"
    session.mkdir()
    (session / "conftest.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from tests.support.secret_scan import SecretScan

            def pytest_configure(config):
                scan = SecretScan(Path({str(tmp_path / "work")!r}), stack_dir=Path({str(stack_dir)!r}))
                config.pluginmanager.register(scan, "secret-scan")
            """
        )
    )
    (session / "test_logs.py").write_text(
        textwrap.dedent(
            f"""
            import logging
            import os
            from tests.support.signin import ISSUED_CODES

            def test_logs():
                log = logging.getLogger("app")
                log.debug("access_token=%s", {ACCESS!r})  # the redaction filter must catch this one
                if os.environ.get("LEAK"):
                    ISSUED_CODES.append("an-authorization-code-0123456789")
                    log.info("retrying with %s", "the-client-secret-42")
                    log.debug("cache entry %s", "an-authorization-code-0123456789")
            """
        )
    )

    def run(leak: bool) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SECRET_SCAN": "0"}
        if leak:
            env["LEAK"] = "1"
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(session), str(session)],
            cwd=session,
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    clean = run(leak=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "secret scan" in clean.stdout and "clean:" in clean.stdout

    leaked = run(leak=True)
    assert leaked.returncode == 1, leaked.stdout + leaked.stderr
    assert "1 passed" in leaked.stdout  # the test itself passed: the scan failed the session
    assert "client secret the-cl... in pytest process log (DEBUG)" in leaked.stdout
    assert "authorization code an-aut... in pytest process log (DEBUG)" in leaked.stdout
    assert "access token" not in leaked.stdout
    assert "the-client-secret-42" not in leaked.stdout
