"""Domain outcomes as HTTP answers: the only place that chooses a status for an error raised by ``collectors/`` or
``shared/``. Pages and JSON bodies never carry a token, code or secret: the errors' texts are written to be shown.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import azure.functions as func

from api.pages import json_answer, page
from collectors.consent import ConsentFailure, ConsentProblem
from shared.errors import CollectorError, ConfigurationError, MailboxAccessError
from shared.signed_links import InvalidLink

logger = logging.getLogger(__name__)

CONSENT_STATUS: Mapping[ConsentFailure, int] = {
    ConsentFailure.INVALID: 400,  # the request or the sign-in response cannot be used
    ConsentFailure.REFUSED: 403,  # the account or the consent was refused
    ConsentFailure.PROVIDER: 502,  # Entra ID refused the app's configuration: the upstream said no
}
UNAVAILABLE = 503  # a service the app depends on did not answer: try again later
MISCONFIGURED = 500


def consent_failure(error: Exception) -> func.HttpResponse:
    """The page for an error of the consent flow; logs what an operator needs (never the flow's secrets)."""
    if isinstance(error, ConsentProblem):
        return page(CONSENT_STATUS[error.kind], error.title, error.detail, error.next_step)
    if isinstance(error, ConfigurationError):
        logger.error("consent failed: %s", error)
        return page(MISCONFIGURED, "The app is not configured correctly", str(error), error.remedy)
    if isinstance(error, CollectorError):
        logger.warning("consent failed: %s", error)
        return page(
            UNAVAILABLE,
            "Temporarily unavailable",
            "A service the app depends on did not answer. Nothing was stored.",
            "Wait a minute and open the authorize link again.",
        )
    logger.exception("consent failed unexpectedly: %s", type(error).__name__)
    return page(500, "Unexpected error", "Nothing was stored.", "Try again; if it persists, check the app's logs.")


def service_failure(error: CollectorError) -> func.HttpResponse:
    """The JSON answer of an admin route when storage or Key Vault fails: 503 with the error class and remedy."""
    return json_answer(UNAVAILABLE, {"error": error.error_class, "message": error.describe()})


# Why adding a mailbox was refused: the server refused the app for this mailbox (an Exchange admin's step is
# missing), or Entra ID refused the app itself (its consent or credential): the upstream said no.
REFUSAL_STATUS: Mapping[type[CollectorError], int] = {MailboxAccessError: 403, ConfigurationError: 502}


def mailbox_refused(error: CollectorError) -> func.HttpResponse:
    """The JSON answer when proving access to a mailbox failed: the error class, what happened and what to do."""
    status = next((code for kind, code in REFUSAL_STATUS.items() if isinstance(error, kind)), UNAVAILABLE)
    logger.warning("mailbox not added error_class=%s error=%s", error.error_class, error)
    return json_answer(status, {"error": error.error_class, "message": str(error), "remedy": error.remedy})


def conflict(message: str) -> func.HttpResponse:
    return json_answer(409, {"error": "conflict", "message": message})


def bad_request(message: str) -> func.HttpResponse:
    return json_answer(400, {"error": "bad_request", "message": message})


def not_found(address: str) -> func.HttpResponse:
    return json_answer(404, {"error": "not_found", "message": f"{address} is not authorized"})


LINK_GONE = 410  # a re-consent link that is changed, expired, used or no longer fits its mailbox: ask for a new one


def link_refused(error: InvalidLink) -> func.HttpResponse:
    """The owner's page for a re-consent link that cannot be used; the reason is safe to show (no secret in it)."""
    reason = str(error)
    return page(
        LINK_GONE,
        "This link cannot be used",
        f"{reason[:1].upper()}{reason[1:]}.",
        "Ask the mail collector's administrator for a new re-consent link.",
    )
