from __future__ import annotations

import base64
import io
import logging

import pytest

from shared.redaction import RedactingFilter, redact

JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImFiYyJ9.eyJzdWIiOiJ1c2VyQGV4YW1wbGUudGVzdCJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
SASL = base64.b64encode(f"user=a@example.test\x01auth=Bearer {JWT}\x01\x01".encode()).decode()


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"token is {JWT}", JWT),
        ("Authorization: Bearer opaque-token-value-123", "opaque-token-value-123"),
        ("POST code=0.AXoA-very-long-code-value&state=abcdef123", "0.AXoA-very-long-code-value"),
        ('{"refresh_token": "1.AbCdEf-refresh-token-material"}', "1.AbCdEf-refresh-token-material"),
        ("client_secret=Kq8~supersecretvalue", "Kq8~supersecretvalue"),
        (f"AUTHENTICATE XOAUTH2 {SASL}", SASL),
        ("AccountKey=Eby8vdM02xNOcqF==;", "Eby8vdM02xNOcqF=="),
        ("rt 0.ARoAv4j5cvGGr0GRqy180BHbR1234567890abcdefghijklmnopqrstuv", "0.ARoAv4j5cvGGr0GRqy180BHbR1234567890"),
        ("GET /callback?code=M.C507_BAY.2.U.opaque&state=af0ifjsldkj", "M.C507_BAY.2.U.opaque"),
        ("GET /callback?code=M.C507_BAY.2.U.opaque&state=af0ifjsldkj", "af0ifjsldkj"),
        ("user_password=hunter2-correct-horse", "hunter2-correct-horse"),
        ("sas_token=sv-2021-sig-opaque-value", "sv-2021-sig-opaque-value"),
        ('{"code": "opaque-authorization-code"}', "opaque-authorization-code"),
        ("nonce: n-0S6_WzA2Mj", "n-0S6_WzA2Mj"),
    ],
)
def test_secrets_are_replaced(text: str, secret: str) -> None:
    cleaned = redact(text)
    assert secret not in cleaned
    assert "[redacted]" in cleaned


@pytest.mark.parametrize(
    "line",
    [
        "collect mailbox=support@contoso.com outcome=ok messages=3 bytes=1200 duration_ms=52",
        "Key Vault write failed status_code=503 retry_after=2",
        "token renewal refused error_code=AADSTS50173 mailbox=support@contoso.com",
        "address postcode: 12345 city: Lyon",
        "outcome=token_save_pending error=TransientError",
        "imap barcode=12 encode=utf-8 statement=ok",
    ],
)
def test_ordinary_fields_survive(line: str) -> None:
    assert redact(line) == line


def test_filter_scrubs_args_and_tracebacks() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "refresh failed token=%s", (JWT,), None)
    try:
        raise RuntimeError(f"server said Bearer {JWT}")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    RedactingFilter().filter(record)
    assert JWT not in record.getMessage()
    assert record.exc_text and JWT not in record.exc_text


def test_control_and_bidi_characters_in_a_message_are_escaped(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.escape")
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    try:
        logger.warning("consent refused signed_in=%s", "eve\r\nINFO forged\u202etxt.exe\x00\u200b é")
    finally:
        logger.removeHandler(handler)
    text = handler.stream.getvalue()  # type: ignore[attr-defined]
    assert text == "consent refused signed_in=eve\\r\\nINFO forged\\u202etxt.exe\\x00\\u200b é\n"
