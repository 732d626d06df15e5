"""The one logging set-up: redaction in front of every handler, no mail content at any level, SDK lines muted."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from collectors import cli
from shared.errors import TransientError
from shared.logging_setup import MAIL_CONTENT_LOGGER, SDK_LOGGER, configure_logging
from shared.redaction import RedactingFilter


@pytest.fixture(autouse=True)
def _restore_levels() -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in (SDK_LOGGER, MAIL_CONTENT_LOGGER)}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def _mail_line_logged(caplog: pytest.LogCaptureFixture) -> bool:
    caplog.clear()
    logging.getLogger(f"{MAIL_CONTENT_LOGGER}.imaplib").debug("  < * 1 FETCH (BODY[] {12} Hello, world)")
    return "Hello, world" in caplog.text


def test_debug_logging_keeps_mail_content_out(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger(MAIL_CONTENT_LOGGER).setLevel(logging.DEBUG)
    assert _mail_line_logged(caplog), "the probe line is not captured: the test proves nothing"
    configure_logging(level=logging.DEBUG, sdk_requests=True)
    assert not _mail_line_logged(caplog)


def test_sdk_request_lines_are_muted_unless_asked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    configure_logging()
    assert not logging.getLogger(f"{SDK_LOGGER}.core.pipeline").isEnabledFor(logging.INFO)
    configure_logging(sdk_requests=True)
    assert logging.getLogger(f"{SDK_LOGGER}.core.pipeline").isEnabledFor(logging.INFO)


def test_every_root_handler_gets_the_redaction_filter() -> None:
    configure_logging()
    configure_logging()
    handlers = logging.getLogger().handlers
    assert handlers
    for handler in handlers:
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1


def test_cli_verbose_keeps_mail_content_out(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import collectors.services

    def unavailable() -> None:
        raise TransientError("storage unavailable")

    monkeypatch.setattr(collectors.services, "get_services", unavailable)
    caplog.set_level(logging.DEBUG)
    logging.getLogger(MAIL_CONTENT_LOGGER).setLevel(logging.DEBUG)
    assert cli.main(["list", "--verbose"]) == 1
    assert "storage unavailable" in capsys.readouterr().err
    assert not _mail_line_logged(caplog)
    assert logging.getLogger(f"{SDK_LOGGER}.core.pipeline").isEnabledFor(logging.DEBUG)
