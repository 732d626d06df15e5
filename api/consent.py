"""Consent routes: the admin's authorize link and Entra ID's form post back to the app."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import azure.functions as func

from api.identity import acting_admin
from api.pages import page, redirect
from api.statuses import consent_failure
from collectors.services import get_services

MAX_FORM_BYTES = 32 * 1024  # Entra's form post holds a code, a state and a session id: a few KB at most
CALLBACK_ROUTE = "auth/callback"

blueprint = func.Blueprint()  # type: ignore[no-untyped-call]  # the library leaves its __init__ untyped


def callback_uri(req: func.HttpRequest) -> str:
    configured = get_services().settings.redirect_uri
    if configured:
        return configured
    parts = urlsplit(req.url)
    return f"{parts.scheme}://{parts.netloc}/api/{CALLBACK_ROUTE}"


@blueprint.route(route="mailboxes/{address}/authorize", methods=["GET"])
def authorize_mailbox(req: func.HttpRequest) -> func.HttpResponse:
    """Start the consent flow for a mailbox and redirect the browser to Entra ID."""
    params = dict(req.params)
    params.pop("code", None)  # the function key
    delegate = params.pop("delegate", "")
    try:
        auth_uri = get_services().consent.start(
            req.route_params.get("address", ""),
            redirect_uri=callback_uri(req),
            delegate=delegate,
            options=params,
            admin=acting_admin(req),
        )
    except Exception as e:
        return consent_failure(e)
    return redirect(auth_uri)


@blueprint.route(route=CALLBACK_ROUTE, methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def auth_callback(req: func.HttpRequest) -> func.HttpResponse:
    """Entra's form post: redeem the code, check the account, keep the token cache in Key Vault."""
    body = req.get_body()
    if len(body) > MAX_FORM_BYTES:
        return page(413, "Request too large", "The sign-in response is larger than expected.")
    if not req.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return page(415, "Unexpected request", "The callback accepts only Entra ID's form post.")
    try:
        fields = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body), max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        return page(400, "Malformed request", "The sign-in response could not be read.")
    form = dict(fields)
    if len(form) != len(fields):
        return page(400, "Malformed request", "The sign-in response repeats a field.")
    try:
        result = get_services().consent.complete(form)
    except Exception as e:
        return consent_failure(e)
    verb = "re-authorized" if result.reconsent else "authorized"
    return page(
        200,
        "Mailbox authorized",
        f"{result.address} is {verb} (signed in as {result.signed_in_as}). Its token is stored in Key Vault.",
        "Nothing else to do: new mail is collected at the next scheduled run.",
        ok=True,
    )
