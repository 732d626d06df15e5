"""A logging filter that keeps tokens, codes, secrets and SASL strings out of every log record.

It is a safety net, not the main defence: the code never formats secrets into messages. It also scrubs what
libraries log (MSAL, azure-core, imaplib) when an operator turns on DEBUG.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"

_PATTERNS: tuple[re.Pattern[str], ...] = (
    # JSON Web Tokens (access and id tokens): three base64url segments, the first one a JSON header.
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
    # Bearer credentials in headers or SASL strings.
    re.compile(r"(?i)(bearer\s+)[^\s\"',;\x01]+"),
    # key=value and "key": "value" forms of OAuth secrets, in query strings, form bodies and JSON.
    # The key must start a word: ``status_code=503``, ``error_code=AADSTS50173`` and ``postcode: 12345`` are not
    # secrets (and the Entra error code is what an admin needs), while any ``*_token``, ``*secret`` or
    # ``*password`` key is.
    re.compile(
        r"(?i)(?<![\w-])((?:\w*(?:token|secret|password)|client_assertion|code_verifier|"
        r"code|state|nonce|assertion|sig|AccountKey)[\"']?\s*[=:]\s*[\"']?)[^&\s\"',;]+"
    ),
    # base64 of a SASL XOAUTH2 / OAUTHBEARER initial response ("user=" / "n,a=" prefixes).
    re.compile(r"(?:dXNlcj|bixhPS|biwsYT)[A-Za-z0-9+/=]{16,}"),
    # Microsoft refresh tokens are opaque and long; they start with a version marker such as "0.A".
    re.compile(r"\b[01]\.A[A-Za-z0-9_.\-*]{40,}"),
)


# What a log line must never carry raw: C0 and C1 controls (a CR or LF forges a second line), and the invisible
# format characters (bidi overrides and isolates, zero-width characters) that make a line read as something else.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def escape_controls(text: str) -> str:
    """Return ``text`` with control and bidi characters written as escapes (``\\n``, ``\\u202e``)."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def redact(text: str) -> str:
    """Return ``text`` with every secret-looking value replaced by ``[redacted]``."""
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.lastindex else "") + REDACTED, text)
    return text


class RedactingFilter(logging.Filter):
    """Formats the record once, scrubs it, and freezes the result so handlers see only the scrubbed text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not hide the record
            message = f"{record.msg!r} {record.args!r}"
        # Values in a message come from outside (addresses, names from id tokens, folder names): escaped here.
        record.msg = escape_controls(redact(message))
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Put the filter on ``logger``'s handlers (default: the root logger's), once each.

    Filters on handlers see records from every library logger that propagates to them. Entry points call
    ``shared.logging_setup.configure_logging``, which creates the handler first when there is none.
    """
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
